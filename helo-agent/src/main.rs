//! `helo-agent`: see `helo-agent --help`; all logic is in the library.

fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    let cli = helo_agent::cli::Cli::parse();
    helo_agent::cli::init_logging(cli.log_format);
    match helo_agent::cli::run(cli) {
        Ok(status) => status,
        Err(error) => {
            eprintln!("helo-agent: error: {}", helo_agent::cli::describe(&error));
            std::process::ExitCode::FAILURE
        }
    }
}
