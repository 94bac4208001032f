//! stdd, the distributor daemon: for now its `replay` command (a capture through the real steering, per-TM captures and a summary out).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

/// stdd — the statistical traffic distributor.
#[derive(Debug, Parser)]
#[command(name = "stdd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Steer every frame of a pcap capture with a table: one capture per TM
    /// and summary.json (packets per TM, branch and drop reason; split flows).
    Replay {
        /// Table file.
        #[arg(long)]
        table: PathBuf,
        /// Capture to replay (classic pcap, Ethernet).
        capture: PathBuf,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Print the summary as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "stdd: {} (see stdd --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stdd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Replay {
            table,
            capture,
            out,
            json,
        } => {
            let t = allocation::file::load(&table)
                .with_context(|| format!("cannot use table {}", table.display()))?;
            let input = std::fs::File::open(&capture)
                .with_context(|| format!("cannot open {}", capture.display()))?;
            let s = distributor::replay::replay(t, std::io::BufReader::new(input), &out)
                .with_context(|| format!("replay of {}", capture.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!(
                "replayed {} frames ({} bytes) with table version {}",
                s.frames, s.bytes, s.table_version
            );
            println!(
                "  {:>4} {:>6}  {:<12} {:>10} {:>12}  file",
                "tm", "id", "name", "packets", "bytes"
            );
            for t in &s.tms {
                println!(
                    "  {:>4} {:>6}  {:<12} {:>10} {:>12}  {}",
                    t.index,
                    t.id,
                    t.name,
                    t.packets,
                    t.bytes,
                    out.join(&t.file).display()
                );
            }
            let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
                m.iter()
                    .filter(|(_, &v)| v > 0)
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!("branches: {}", nonzero(&s.branches));
            let drops = nonzero(&s.drops);
            println!(
                "drops: {}",
                if drops.is_empty() {
                    "none".to_string()
                } else {
                    drops
                }
            );
            println!(
                "not steered (bridged, answered, to every TM): {}; fragments held at the end: {}",
                s.not_steered, s.held_at_end
            );
            println!(
                "flows: {} seen, {} in both directions, {} split across TMs",
                s.flows.seen, s.flows.both_directions, s.flows.split
            );
            for e in &s.flows.split_examples {
                println!("  split: {e}");
            }
            println!("wrote {}", out.join("summary.json").display());
            Ok(())
        }
    }
}
