//! The privlink daemon and CLI as a library: the binary's `main` only parses
//! the command line and calls in here; the end-to-end tests use [`netns`]
//! to build their namespaces the same way the demo does.

pub mod approval;
pub mod client;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod device;
pub mod dns;
pub mod flowlog;
pub mod handover;
pub mod health;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod sdnotify;
pub mod state;
pub mod store;
pub mod testbed;
