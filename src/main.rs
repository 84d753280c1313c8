//! The `tasker` command line.

fn main() -> anyhow::Result<()> {
    Ok(())
}
