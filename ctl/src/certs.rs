//! `vipsharectl certs`: create the cluster CA, issue, renew and revoke identity
//! certificates, and rotate the CA.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use vipshare_proto::pki::{self, CertFiles, Role};
use vipshare_proto::v1::{self as pb, mutate_request::Op};

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
    /// Re-issue DIR/ROLE-NAME.crt with a new key: same identity and SANs, replaced
    /// atomically. Daemons pick it up on SIGHUP or within seconds on their own.
    Renew {
        /// Certificate directory holding ca.crt, ca.key and the certificate.
        #[arg(long)]
        dir: PathBuf,
        /// controller, agent, admin or reader.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Identity name, as issued.
        #[arg(long)]
        name: String,
        /// Validity in days from now (capped at the CA's expiry).
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Refuse a certificate cluster-wide, by serial (needs an admin certificate).
    Revoke {
        #[command(flatten)]
        which: SerialArg,
    },
    /// Take a serial off the deny-list again.
    Unrevoke {
        #[command(flatten)]
        which: SerialArg,
    },
    /// Print a certificate's identity, SANs, serial and expiry.
    Show {
        /// PEM certificate file.
        file: PathBuf,
    },
    /// Start a CA rotation: a new CA first in DIR/ca.crt (the old one stays trusted),
    /// the old key kept as ca.key.old. Then distribute ca.crt, renew every leaf, and
    /// finish with `certs ca-prune`.
    CaRotate {
        /// Certificate directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Validity of the new CA in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Finish a CA rotation: DIR/ca.crt keeps only the new CA; ca.key.old is deleted.
    CaPrune {
        /// Certificate directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct SerialArg {
    /// Certificate serial in hex (as `certs show` prints it; ':' and leading zeros ok).
    #[arg(long)]
    serial: Option<String>,
    /// Read the serial from this PEM certificate.
    #[arg(long)]
    cert: Option<PathBuf>,
}

impl SerialArg {
    fn serial(&self) -> anyhow::Result<String> {
        match (&self.serial, &self.cert) {
            (Some(s), _) => Ok(pki::normalize_serial(s)?),
            (None, Some(file)) => Ok(pki::describe_cert(file)?.serial),
            (None, None) => anyhow::bail!("give --serial or --cert"),
        }
    }
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse().map_err(|e: pki::IdentityError| e.to_string())
}

/// Runs the local subcommands; revocations become an admin mutation for the caller
/// to send (`Some(op)`).
pub fn run(cmd: CertsCmd) -> anyhow::Result<Option<Op>> {
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
        CertsCmd::Renew {
            dir,
            role,
            name,
            days,
        } => {
            let cert = dir.join(format!("{role}-{name}.crt"));
            let old = pki::describe_cert(&cert).ok().map(|s| s.serial);
            let files = pki::renew(&dir, role, &name, days)
                .with_context(|| format!("renewing {role} certificate {name:?}"))?;
            print_written(&files)?;
            if let Some(old) = old {
                println!("  replaces serial {old}; revoke it if the old key may have leaked:");
                println!("    vipsharectl certs revoke --serial {old}");
            }
            println!(
                "daemons using these files reload them on SIGHUP, or by themselves within seconds"
            );
        }
        CertsCmd::Revoke { which } => {
            return Ok(Some(Op::Revoke(pb::Revoke {
                serial: which.serial()?,
            })))
        }
        CertsCmd::Unrevoke { which } => {
            return Ok(Some(Op::Unrevoke(pb::Unrevoke {
                serial: which.serial()?,
            })))
        }
        CertsCmd::Show { file } => describe(&file)?,
        CertsCmd::CaRotate { dir, days } => {
            let files = pki::rotate_ca(&dir, days)
                .with_context(|| format!("rotating the CA in {}", dir.display()))?;
            print_written(&files)?;
            println!(
                "{} now trusts the new and the old CA; next: copy it to every host (daemons reload it), \
                 `certs renew` every certificate, then `certs ca-prune --dir {}`",
                files.cert.display(),
                dir.display()
            );
        }
        CertsCmd::CaPrune { dir } => {
            let files = pki::prune_ca(&dir)
                .with_context(|| format!("pruning the CA bundle in {}", dir.display()))?;
            println!("wrote {}", files.cert.display());
            describe(&files.cert)?;
            println!("copy it to every host; certificates of the old CA are refused once daemons reload it");
        }
    }
    Ok(None)
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
        "  {} [{}], serial {}, expires {}",
        s.subject,
        sans.join(", "),
        s.serial,
        s.expires
    );
    match &s.cluster_id {
        Some(id) => println!("  cluster ID {id}"),
        None => println!("  no cluster ID (made before cluster IDs; rotate the CA to get one)"),
    }
    Ok(())
}
