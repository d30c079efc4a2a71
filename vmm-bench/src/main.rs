//! `vmm-bench`: parses the command line and runs the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = vmm_bench::Cli::parse();
    let json = cli.options.json;
    // Builds the runtime itself: --split-cpus pins the thread that builds it.
    match vmm_bench::run_blocking(cli) {
        Ok(report) => {
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.table());
            }
            if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("vmm-bench: {err}");
            ExitCode::FAILURE
        }
    }
}
