//! `helo-agent`: see `helo-agent --help`; all logic is in the library.

fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    let cli = helo_agent::cli::Cli::parse();
    helo_agent::cli::init_logging(cli.log_format);
    match helo_agent::cli::run(cli) {
        Ok(status) => status,
        // A reader that went away (`helo-agent list | head -1`) is not an error to report.
        Err(error)
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("helo-agent: error: {}", helo_agent::cli::describe(&error));
            std::process::ExitCode::FAILURE
        }
    }
}
