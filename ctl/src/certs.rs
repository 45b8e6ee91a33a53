//! `vipsharectl certs`: create the cluster CA and issue identity certificates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use vipshare_proto::pki::{self, CertFiles, Role};

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create the cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Certificate directory (created, mode 0700, if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Cluster name, recorded in the CA and in every certificate it issues.
        #[arg(long)]
        cluster: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate signed by the CA in DIR: DIR/ROLE-NAME.crt and .key.
    Issue {
        /// Certificate directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// controller, agent, admin or reader.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Identity name; for a controller, its raft id (e.g. 1).
        #[arg(long)]
        name: String,
        /// IP address peers dial this process at (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// DNS name peers dial this process at (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Validity in days (capped at the CA's expiry).
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse().map_err(|e: pki::IdentityError| e.to_string())
}

pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { dir, cluster, days } => {
            let files = pki::init_ca(&dir, &cluster, days)
                .with_context(|| format!("creating the CA in {}", dir.display()))?;
            print_written(&files)?;
            println!(
                "next: vipsharectl certs issue --dir {} --role controller --name 1 --ip ADDRESS",
                dir.display()
            );
        }
        CertsCmd::Issue {
            dir,
            role,
            name,
            ips,
            dns,
            days,
        } => {
            let files = pki::issue(&dir, role, &name, &ips, &dns, days)
                .with_context(|| format!("issuing {role} certificate {name:?}"))?;
            print_written(&files)?;
            if role == Role::Controller && ips.is_empty() && dns.is_empty() {
                eprintln!(
                    "warning: no --ip or --dns given; clients verify a controller by the address \
                     they dial, so they will refuse this certificate"
                );
            }
        }
    }
    Ok(())
}

fn print_written(files: &CertFiles) -> anyhow::Result<()> {
    println!("wrote {}", files.cert.display());
    println!("wrote {} (private key, mode 0600)", files.key.display());
    describe(&files.cert)
}

fn describe(cert: &Path) -> anyhow::Result<()> {
    let s = pki::describe_cert(cert)?;
    let mut sans = s.uris.clone();
    sans.extend(s.ips.iter().map(|ip| format!("IP:{ip}")));
    sans.extend(s.dns.iter().map(|d| format!("DNS:{d}")));
    println!(
        "  {} [{}], expires {}",
        s.subject,
        sans.join(", "),
        s.expires
    );
    Ok(())
}
