//! One command-line error path for every binary: help and version print and exit 0; a usage error is one line naming the program, exit 2; a failed run is one line with its causes, exit 1.

use std::path::Path;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

/// The parsed arguments, or the exit code when there is nothing to run
/// (help or version printed: 0; a usage error, one line on stderr: 2).
pub fn parse<C: Parser>(program: &str) -> Result<C, ExitCode> {
    parse_from(program, std::env::args_os())
}

/// [`parse`] over given arguments (the first is the program's name).
pub fn parse_from<C, I, T>(program: &str, args: I) -> Result<C, ExitCode>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match C::try_parse_from(args) {
        Ok(c) => Ok(c),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}", usage_line(program, &e.render().to_string()));
            Err(ExitCode::from(2))
        }
    }
}

/// The one line a usage error prints.
pub fn usage_line(program: &str, rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    format!(
        "{program}: {} (see {program} --help)",
        first.trim_start_matches("error: ")
    )
}

/// The exit code of a run: 0, or 1 with `program: error: cause: cause` on stderr.
pub fn finish(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// What a daemon's `check-config` found: a summary when the configuration
/// is fit to run, else every problem, one line each.
pub type CheckOutcome = Result<String, Vec<String>>;

/// Prints a `check-config` outcome for `path`: `ok: SUMMARY` on stdout, or
/// each problem as `program: PROBLEM` on stderr and an error counting them
/// (for [`finish`]).
pub fn report_check(program: &str, path: &Path, outcome: CheckOutcome) -> anyhow::Result<()> {
    match outcome {
        Ok(summary) => {
            println!("ok: {summary}");
            Ok(())
        }
        Err(problems) => {
            for p in &problems {
                eprintln!("{program}: {p}");
            }
            let n = problems.len();
            anyhow::bail!(
                "{}: {n} problem{}",
                path.display(),
                if n == 1 { "" } else { "s" }
            )
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn a_usage_error_is_one_line_naming_the_program() {
        assert_eq!(
            usage_line(
                "stdd",
                "error: unexpected argument '--x' found\n\nUsage: stdd run\n"
            ),
            "stdd: unexpected argument '--x' found (see stdd --help)"
        );
        assert_eq!(
            usage_line("tmd", ""),
            "tmd: invalid arguments (see tmd --help)"
        );
    }
}
