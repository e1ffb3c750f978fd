//! Hand-over: a new daemon (`privlink run --takeover`, or the one SIGUSR2
//! starts) takes over from the running one without a gap in forwarding.
//!
//! The two talk over `handover.sock` in the state directory (mode 0600
//! inside the 0700 directory), one line at a time:
//!
//! 1. new -> old `takeover`: the old daemon freezes its flow table (no flow
//!    is created or ended there any more; established flows keep being
//!    forwarded), writes the sidecar, and answers `frozen` with its state
//!    lock's descriptor attached (`SCM_RIGHTS`), so the lock passes to the
//!    new daemon without ever being free.
//! 2. The new daemon maps the same flow table (shared, indexes as they are),
//!    takes the old one's ids, attaches its own queues to the same
//!    persistent devices and starts its workers: from here both forward,
//!    and the kernel spreads packets over both daemons' queues.
//! 3. new -> old `forwarding`: the old daemon stops serving metrics and the
//!    API, stops its workers and closes its queues, and answers `bye`.
//! 4. The new daemon binds the metrics port and the control socket.
//!
//! If the new daemon goes away before `forwarding` (it failed to start),
//! the old one thaws its table and goes on as if nothing happened.

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long either side waits for the other's next line.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("handover.sock")
}

/// Listens for a successor; calls `on_request` with each connection (the
/// reconfiguration thread answers it). A stale socket file is replaced.
pub fn listen(state_dir: &Path, on_request: impl Fn(UnixStream) + Send + 'static) -> Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    std::thread::Builder::new()
        .name("privlink-handover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => on_request(s),
                    Err(e) => tracing::warn!("hand-over socket: {e}"),
                }
            }
        })
        .context("cannot start the hand-over thread")?;
    Ok(())
}

/// Reads one line (without the newline); EOF is an error.
fn read_line(r: &mut BufReader<UnixStream>) -> Result<String> {
    let mut s = String::new();
    if r.read_line(&mut s).context("hand-over socket")? == 0 {
        bail!("the other daemon hung up");
    }
    Ok(s.trim_end().to_string())
}

/// The running daemon's side of one hand-over.
#[derive(Debug)]
pub struct Predecessor {
    reader: BufReader<UnixStream>,
}

impl Predecessor {
    /// Reads the successor's request.
    pub fn accept(stream: UnixStream) -> Result<Predecessor> {
        stream.set_read_timeout(Some(STEP_TIMEOUT))?;
        let mut reader = BufReader::new(stream);
        let line = read_line(&mut reader)?;
        if line != "takeover" {
            bail!("unexpected hand-over request `{}`", line.escape_debug());
        }
        Ok(Predecessor { reader })
    }

    /// Answers `frozen`, passing the state lock.
    pub fn frozen(&mut self, lock: BorrowedFd<'_>) -> Result<()> {
        let fds = [lock.as_raw_fd()];
        let iov = [IoSlice::new(b"frozen\n")];
        sendmsg::<()>(
            self.reader.get_ref().as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .context("cannot pass the state lock")?;
        Ok(())
    }

    /// Waits for the successor to forward.
    pub fn wait_forwarding(&mut self) -> Result<()> {
        match read_line(&mut self.reader)?.as_str() {
            "forwarding" => Ok(()),
            other => bail!("unexpected hand-over message `{}`", other.escape_debug()),
        }
    }

    /// The last word: this daemon forwards no more and holds no port.
    pub fn bye(mut self) {
        let _ = self.reader.get_mut().write_all(b"bye\n");
    }
}

/// The new daemon's side.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
}

impl Successor {
    /// Connects to the running daemon of `state_dir`, asks it to freeze,
    /// and returns the state lock it passes.
    pub fn request(state_dir: &Path) -> Result<(Successor, OwnedFd)> {
        let path = socket_path(state_dir);
        let stream = UnixStream::connect(&path)
            .with_context(|| format!("no running privlink to take over from at {}", path.display()))?;
        stream.set_read_timeout(Some(STEP_TIMEOUT))?;
        (&stream).write_all(b"takeover\n")?;
        let mut buf = [0u8; 7];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut lock = None;
        let n = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                .context("no answer from the running privlink")?;
            for c in msg.cmsgs().context("hand-over answer")? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: the kernel just installed this descriptor
                        // in this process for us; nothing else owns it.
                        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                        lock.get_or_insert(owned);
                    }
                }
            }
            msg.bytes
        };
        if &buf[..n] != b"frozen\n" {
            bail!("the running privlink refused the hand-over");
        }
        let lock = lock.context("the running privlink did not pass its state lock")?;
        Ok((Successor { stream }, lock))
    }

    /// Tells the old daemon this one forwards, and waits until it has let
    /// go of everything (its `bye`, or its exit).
    pub fn forwarding(self) -> Result<()> {
        (&self.stream).write_all(b"forwarding\n")?;
        let mut r = BufReader::new(self.stream);
        match read_line(&mut r) {
            Ok(l) if l == "bye" => Ok(()),
            Ok(l) => bail!("unexpected hand-over message `{}`", l.escape_debug()),
            // Exited without a word: it let go of everything too.
            Err(_) => Ok(()),
        }
    }
}
