//! `vipsharectl`: certificates and cluster operations.

mod certs;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vipsharectl", version, about = "Operate a vipshare cluster")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster CA and issue certificates.
    #[command(subcommand)]
    Certs(certs::CertsCmd),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Certs(c) => certs::run(c),
    }
}
