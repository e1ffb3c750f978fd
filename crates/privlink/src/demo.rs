//! `privlink demo` (written next).
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
