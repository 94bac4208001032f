//! What a package ships beside a program, made from its clap definition: man pages (clap_mangen; one for the program and one per subcommand, `stdctl-table-new.1`) and shell completions (clap_complete: bash, zsh, fish).

use std::path::Path;

use clap::{CommandFactory, ValueEnum};

/// What `PROGRAM generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Generated {
    /// Man pages, into `--dir`.
    Man,
    /// bash completion, on stdout.
    Bash,
    /// zsh completion, on stdout.
    Zsh,
    /// fish completion, on stdout.
    Fish,
}

/// The arguments of the (hidden) `generate` subcommand every program has.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// What to write.
    #[arg(value_enum)]
    pub what: Generated,
    /// Directory the man pages go to (created if missing).
    #[arg(long, required_if_eq("what", "man"))]
    pub dir: Option<std::path::PathBuf>,
    /// Man page section.
    #[arg(long, default_value = "1")]
    pub section: String,
}

/// Writes what `args` asks for program `C`.
pub fn generate<C: CommandFactory>(args: &GenerateArgs) -> anyhow::Result<()> {
    let mut cmd = C::command();
    cmd.build();
    let name = cmd.get_name().to_string();
    let shell = match args.what {
        Generated::Man => {
            let dir = args.dir.as_deref().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            return man(&cmd, &name, &args.section, dir);
        }
        Generated::Bash => clap_complete::Shell::Bash,
        Generated::Zsh => clap_complete::Shell::Zsh,
        Generated::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}

/// The page of `cmd` as `NAME.SECTION`, then one per visible subcommand.
fn man(cmd: &clap::Command, name: &str, section: &str, dir: &Path) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_string());
    let file = dir.join(format!("{name}.{section}"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .section(section)
        .manual("STD cluster manual")
        .render(&mut out)?;
    std::fs::write(&file, out).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        man(sub, &format!("{name}-{}", sub.get_name()), section, dir)?;
    }
    Ok(())
}
