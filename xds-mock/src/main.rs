//! The `xds-mock` command: not built yet; it says so instead of pretending to serve.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("xds-mock: the control plane server is not implemented yet (tracked by the xDS issue)");
    ExitCode::from(2)
}
