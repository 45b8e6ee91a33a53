//! Certificate tooling: a per-cluster CA and the leaf certificates that carry every
//! process's identity as a SAN URI `vipshare://CLUSTER/ROLE/NAME`.
//!
//! Layout of a certificate directory: `ca.crt`, `ca.key`, and one `ROLE-NAME.crt` /
//! `ROLE-NAME.key` pair per issued identity. Keys are PKCS#8 PEM, mode 0600.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

/// URI scheme of identities carried in certificates.
pub const URI_SCHEME: &str = "vipshare";
/// File name of the CA certificate in a certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key in a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Longest cluster or identity name accepted.
pub const MAX_NAME_LEN: usize = 64;
/// Longest validity accepted for any certificate (about 100 years).
pub const MAX_DAYS: u32 = 36_500;

/// Role and name of the CA's own URI, which records the cluster it belongs to.
const CA_URI_TAIL: &str = "ca/ca";
/// Issued certificates start this long in the past to tolerate clock skew between hosts.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// What a certificate holder may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Controller,
    Agent,
    Admin,
    Reader,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Controller, Role::Agent, Role::Admin, Role::Reader];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Reader => "reader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_string()))
    }
}

/// Why a string is not a valid identity or identity part.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("{0:?} is not a vipshare identity URI (expected vipshare://CLUSTER/ROLE/NAME)")]
    NotIdentityUri(String),
    #[error("unknown role {0:?} (expected controller, agent, admin or reader)")]
    UnknownRole(String),
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidPart {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Who a peer is: cluster, role and name, as written in its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub cluster: String,
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// A validated identity. Controller names must be a raft id (decimal, non-zero,
    /// no leading zeros) so that one id has exactly one spelling.
    pub fn new(
        cluster: impl Into<String>,
        role: Role,
        name: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = Identity {
            cluster: cluster.into(),
            role,
            name: name.into(),
        };
        validate_part("cluster name", &id.cluster)?;
        validate_part("name", &id.name)?;
        if role == Role::Controller && id.controller_id().is_none() {
            return Err(IdentityError::InvalidPart {
                what: "controller name",
                value: id.name,
                reason: "must be the controller's raft id (a non-zero decimal number, e.g. 1)",
            });
        }
        Ok(id)
    }

    /// `vipshare://CLUSTER/ROLE/NAME`.
    pub fn to_uri(&self) -> String {
        format!(
            "{URI_SCHEME}://{}/{}/{}",
            self.cluster, self.role, self.name
        )
    }

    /// Inverse of [`Identity::to_uri`]; validates every part.
    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let not_uri = || IdentityError::NotIdentityUri(uri.to_string());
        let rest = uri
            .strip_prefix(URI_SCHEME)
            .and_then(|r| r.strip_prefix("://"))
            .ok_or_else(not_uri)?;
        let mut parts = rest.split('/');
        let (Some(cluster), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(not_uri());
        };
        Identity::new(cluster, role.parse()?, name)
    }

    /// The raft id, for controllers only.
    pub fn controller_id(&self) -> Option<u64> {
        if self.role != Role::Controller || self.name.starts_with('0') {
            return None;
        }
        if !self.name.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        self.name.parse().ok().filter(|&id| id != 0)
    }

    /// `ROLE-NAME`, the file stem used for this identity's certificate and key.
    pub fn file_stem(&self) -> String {
        format!("{}-{}", self.role, self.name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

// Names end up in file names and URIs, so keep them to a boring, path-safe alphabet.
fn validate_part(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let bad = |reason| {
        Err(IdentityError::InvalidPart {
            what,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > MAX_NAME_LEN {
        return bad("longer than 64 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("use only letters, digits, '.', '_' and '-'");
    }
    if !value.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    Ok(())
}

/// Everything that can go wrong creating or reading certificates and keys.
#[derive(Debug, Error)]
pub enum PkiError {
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} already exists; refusing to overwrite it (move it away first if you really mean to replace it)", .path.display())]
    Exists { path: PathBuf },
    #[error("no CA in {}: {} is missing (create one with `vipsharectl certs init --dir {} --cluster NAME`)", .dir.display(), .path.display(), .dir.display())]
    NoCa { dir: PathBuf, path: PathBuf },
    #[error("{}: private key is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`", .path.display(), .path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{}: {reason}", .path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("invalid identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("invalid argument: {0}")]
    Argument(String),
    #[error("cannot generate {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
}

impl PkiError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PkiError + 'a {
        move |source| PkiError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    fn invalid(path: &Path, reason: impl Into<String>) -> PkiError {
        PkiError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Paths written by [`init_ca`] or [`issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Create the cluster CA in `dir` (created 0700 if missing): `ca.crt` and `ca.key`.
/// The cluster name is recorded in the CA as the SAN URI `vipshare://CLUSTER/ca/ca`.
pub fn init_ca(dir: &Path, cluster: &str, days: u32) -> Result<CertFiles, PkiError> {
    validate_part("cluster name", cluster)?;
    let validity = validity(days)?;
    let files = CertFiles {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    create_dir(dir)?;
    refuse_existing(&[&files.cert, &files.key])?;

    let key = KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "CA key",
        source,
    })?;
    let mut params = CertificateParams::default();
    // A per-CA tag in the subject: verifiers pick trust anchors by subject, so two CAs
    // with the same name would report a foreign CA as a bad signature, not unknown.
    let tag: String = params
        .key_identifier(&key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("vipshare CA {cluster} {tag}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "vipshare");
    params.subject_alt_names = vec![SanType::URI(
        format!("{URI_SCHEME}://{cluster}/{CA_URI_TAIL}")
            .try_into()
            .map_err(|source| PkiError::Generate {
                what: "CA URI",
                source,
            })?,
    )];
    // Path length 0: the CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity;
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "CA certificate",
            source,
        })?;
    write_pair(&files, &cert.pem(), &key.serialize_pem())?;
    Ok(files)
}

/// Issue a certificate for `role`/`name` signed by the CA in `dir`, valid as both TLS
/// server and client, with the identity URI plus the given IP and DNS SANs. Writes
/// `ROLE-NAME.crt` and `ROLE-NAME.key` (0600) and refuses to overwrite them.
/// Validity is capped at the CA's own expiry.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    ips: &[IpAddr],
    dns: &[String],
    days: u32,
) -> Result<CertFiles, PkiError> {
    let (not_before, mut not_after) = validity(days)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    for path in [&ca_cert_path, &ca_key_path] {
        if !path.exists() {
            return Err(PkiError::NoCa {
                dir: dir.to_path_buf(),
                path: path.clone(),
            });
        }
    }
    let ca_pem = read_file(&ca_cert_path)?;
    let ca_der = first_cert(&ca_cert_path, &ca_pem)?;
    let ca = CaInfo::parse(&ca_cert_path, &ca_der)?;
    let identity = Identity::new(ca.cluster, role, name)?;
    let stem = identity.file_stem();
    let files = CertFiles {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    };
    refuse_existing(&[&files.cert, &files.key])?;

    let mut sans = vec![uri_san(&identity.to_uri())?];
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    for host in dns {
        // webpki matches DNS SANs only if they are syntactically valid names.
        rustls_pki_types::DnsName::try_from(host.as_str())
            .map_err(|_| PkiError::Argument(format!("{host:?} is not a valid DNS name")))?;
        let ia5 = host
            .as_str()
            .try_into()
            .map_err(|_| PkiError::Argument(format!("{host:?} is not a valid DNS name")))?;
        sans.push(SanType::DnsName(ia5));
    }

    let ca_key = load_key_pair(&ca_key_path)?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)
        .map_err(|e| PkiError::invalid(&ca_cert_path, format!("unusable CA certificate: {e}")))?;

    if not_after > ca.not_after {
        not_after = ca.not_after;
    }
    let key = KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "key",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.file_stem());
    params.distinguished_name.push(
        DnType::OrganizationName,
        format!("vipshare {}", identity.cluster),
    );
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate {
            what: "certificate",
            source,
        })?;

    write_pair(&files, &cert.pem(), &key.serialize_pem())?;
    Ok(files)
}

/// Read a PEM private key, refusing one that group or others can access.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let pem = read_key_pem(path)?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::invalid(path, format!("no usable PEM private key: {e}")))
}

/// Read every certificate of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::invalid(path, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::invalid(path, "contains no PEM certificate"));
    }
    Ok(certs)
}

/// Human-relevant facts of a certificate, for CLIs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub uris: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub dns: Vec<String>,
    pub is_ca: bool,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// `not_after` for display.
    pub expires: String,
}

/// Summarise the first certificate of a PEM file.
pub fn describe_cert(path: &Path) -> Result<CertSummary, PkiError> {
    let pem = read_file(path)?;
    let der = first_cert(path, &pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::invalid(path, format!("unparsable certificate: {e}")))?;
    let names = san_names(&cert).map_err(|e| PkiError::invalid(path, e))?;
    let mut summary = CertSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        uris: Vec::new(),
        ips: Vec::new(),
        dns: Vec::new(),
        is_ca: cert.is_ca(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        expires: cert.validity().not_after.to_string(),
    };
    for name in names {
        match name {
            GeneralName::URI(u) => summary.uris.push(u.to_string()),
            GeneralName::DNSName(d) => summary.dns.push(d.to_string()),
            GeneralName::IPAddress(b) => {
                if let Some(ip) = ip_from_bytes(b) {
                    summary.ips.push(ip);
                }
            }
            _ => {}
        }
    }
    Ok(summary)
}

/// The cluster a CA certificate (PEM file) was created for.
pub fn ca_cluster(path: &Path) -> Result<String, PkiError> {
    let pem = read_file(path)?;
    let der = first_cert(path, &pem)?;
    Ok(CaInfo::parse(path, &der)?.cluster)
}

/// Why a certificate does not carry a usable identity.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CertIdentityError {
    #[error("unparsable certificate: {0}")]
    Unparsable(String),
    #[error("certificate has no vipshare:// SAN URI identity")]
    Missing,
    #[error("certificate has several vipshare:// SAN URIs: {0:?}")]
    Ambiguous(Vec<String>),
    #[error("certificate identity: {0}")]
    Invalid(#[from] IdentityError),
}

/// The identity in a DER certificate: its one `vipshare://` SAN URI. Other URIs
/// (e.g. SPIFFE ids) are ignored.
pub fn cert_identity(der: &[u8]) -> Result<Identity, CertIdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertIdentityError::Unparsable(e.to_string()))?;
    let names = san_names(&cert).map_err(CertIdentityError::Unparsable)?;
    let prefix = format!("{URI_SCHEME}://");
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(&prefix) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(CertIdentityError::Missing),
        [uri] => Ok(Identity::parse_uri(uri)?),
        many => Err(CertIdentityError::Ambiguous(
            many.iter().map(|u| u.to_string()).collect(),
        )),
    }
}

fn san_names<'a>(
    cert: &'a x509_parser::certificate::X509Certificate<'a>,
) -> Result<Vec<GeneralName<'a>>, String> {
    match cert.subject_alternative_name() {
        Ok(Some(ext)) => Ok(ext.value.general_names.clone()),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(format!("bad subjectAltName extension: {e}")),
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

struct CaInfo {
    cluster: String,
    not_after: OffsetDateTime,
}

impl CaInfo {
    fn parse(path: &Path, der: &[u8]) -> Result<CaInfo, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PkiError::invalid(path, format!("unparsable CA certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(PkiError::invalid(path, "not a CA certificate"));
        }
        let names = san_names(&cert).map_err(|e| PkiError::invalid(path, e))?;
        let cluster = names
            .iter()
            .find_map(|n| match n {
                GeneralName::URI(u) => u
                    .strip_prefix(URI_SCHEME)
                    .and_then(|r| r.strip_prefix("://"))
                    .and_then(|r| r.strip_suffix(CA_URI_TAIL))
                    .and_then(|r| r.strip_suffix('/')),
                _ => None,
            })
            .ok_or_else(|| {
                PkiError::invalid(
                    path,
                    "not a vipshare CA (no vipshare://CLUSTER/ca/ca URI); create one with `vipsharectl certs init`",
                )
            })?;
        validate_part("cluster name", cluster)?;
        Ok(CaInfo {
            cluster: cluster.to_string(),
            not_after: cert.validity().not_after.to_datetime(),
        })
    }
}

fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    Ok(SanType::URI(uri.try_into().map_err(|source| {
        PkiError::Generate {
            what: "identity URI",
            source,
        }
    })?))
}

fn validity(days: u32) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    if days == 0 || days > MAX_DAYS {
        return Err(PkiError::Argument(format!(
            "validity of {days} days is out of range (1..={MAX_DAYS})"
        )));
    }
    let now = OffsetDateTime::now_utc();
    Ok((now - BACKDATE, now + time::Duration::days(i64::from(days))))
}

fn first_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(PkiError::invalid(path, format!("bad PEM certificate: {e}"))),
        None => Err(PkiError::invalid(path, "contains no PEM certificate")),
    }
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(PkiError::io("read", path))
}

fn read_key_pem(path: &Path) -> Result<String, PkiError> {
    let mut file = File::open(path).map_err(PkiError::io("open", path))?;
    // fstat the open file, so the check applies to what is actually read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file
            .metadata()
            .map_err(PkiError::io("stat", path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyPermissions {
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
    }
    let mut pem = String::new();
    file.read_to_string(&mut pem)
        .map_err(PkiError::io("read", path))?;
    Ok(pem)
}

fn load_key_pair(path: &Path) -> Result<KeyPair, PkiError> {
    let pem = read_key_pem(path)?;
    KeyPair::from_pem(&pem)
        .map_err(|e| PkiError::invalid(path, format!("no usable PEM private key: {e}")))
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(PkiError::io("create directory", dir))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    for path in paths {
        // symlink_metadata: a dangling symlink still counts as "exists".
        if path.symlink_metadata().is_ok() {
            return Err(PkiError::Exists {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Write key then certificate, both with `create_new` so a concurrent writer or a file
/// that appeared meanwhile is never clobbered; on failure remove what was written.
fn write_pair(files: &CertFiles, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    write_new(&files.key, key_pem, 0o600)?;
    if let Err(e) = write_new(&files.cert, cert_pem, 0o644) {
        let _ = fs::remove_file(&files.key);
        return Err(e);
    }
    Ok(())
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        // Applied at creation, so the key is never readable by others, even briefly.
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            PkiError::io("create", path)(e)
        }
    })?;
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(PkiError::io("write", path)(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
        }
        assert!("Admin".parse::<Role>().is_err());
        assert!("ca".parse::<Role>().is_err());
    }

    #[test]
    fn identity_uri_round_trips() {
        let id = Identity::new("prod", Role::Agent, "node-7.rack2").unwrap();
        assert_eq!(id.to_uri(), "vipshare://prod/agent/node-7.rack2");
        assert_eq!(Identity::parse_uri(&id.to_uri()), Ok(id));
    }

    #[test]
    fn identity_uri_rejects_malformed() {
        for bad in [
            "",
            "https://prod/admin/a",
            "vipshare://prod/admin",
            "vipshare://prod/admin/a/b",
            "vipshare://prod/admin/",
            "vipshare:///admin/a",
            "vipshare://prod/root/a",
            "vipshare://prod/admin/../x",
            "vipshare://pr od/admin/a",
            "vipshare://prod/ca/ca",
            "vipshare://prod/controller/x",
            "vipshare://prod/controller/0",
            "vipshare://prod/controller/01",
        ] {
            assert!(Identity::parse_uri(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn controller_id_only_for_controllers() {
        let c = Identity::parse_uri("vipshare://prod/controller/12").unwrap();
        assert_eq!(c.controller_id(), Some(12));
        let a = Identity::parse_uri("vipshare://prod/admin/12").unwrap();
        assert_eq!(a.controller_id(), None);
        // Fields are public: a hand-built identity with a non-canonical id gets none.
        let odd = Identity {
            cluster: "prod".into(),
            role: Role::Controller,
            name: "+1".into(),
        };
        assert_eq!(odd.controller_id(), None);
    }

    #[test]
    fn init_and_issue_write_private_keys_and_identity() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let ca = init_ca(&dir, "prod", 10).unwrap();
        assert_eq!(ca_cluster(&ca.cert).unwrap(), "prod");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca.key), 0o600);
        assert_eq!(mode(&dir), 0o700);

        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let files = issue(
            &dir,
            Role::Controller,
            "2",
            &[ip],
            &["c2.example".to_string()],
            365,
        )
        .unwrap();
        assert_eq!(files.cert, dir.join("controller-2.crt"));
        assert_eq!(mode(&files.key), 0o600);
        let summary = describe_cert(&files.cert).unwrap();
        assert_eq!(summary.uris, vec!["vipshare://prod/controller/2"]);
        assert_eq!(summary.ips, vec![ip]);
        assert_eq!(summary.dns, vec!["c2.example"]);
        assert!(!summary.is_ca);
        // Capped at the CA's 10 days even though 365 were asked for.
        let ca_summary = describe_cert(&ca.cert).unwrap();
        assert!(summary.not_after <= ca_summary.not_after);
        let der = load_certs(&files.cert).unwrap();
        assert_eq!(
            cert_identity(&der[0]).unwrap(),
            Identity::new("prod", Role::Controller, "2").unwrap()
        );
        load_key(&files.key).unwrap();
    }

    #[test]
    fn refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), "prod", 10).unwrap();
        let before = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
        let err = init_ca(tmp.path(), "prod", 10).unwrap_err();
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        assert_eq!(fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), before);

        issue(tmp.path(), Role::Admin, "alice", &[], &[], 1).unwrap();
        let err = issue(tmp.path(), Role::Admin, "alice", &[], &[], 1).unwrap_err();
        assert!(err.to_string().contains("admin-alice.crt"), "{err}");
    }

    #[test]
    fn load_key_refuses_readable_key() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let ca = init_ca(tmp.path(), "prod", 10).unwrap();
        fs::set_permissions(&ca.key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_key(&ca.key).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PkiError::KeyPermissions { mode: 0o640, .. }));
        assert!(
            msg.contains(&format!("chmod 600 {}", ca.key.display())),
            "{msg}"
        );
        // issue() reads the CA key through the same check.
        let err = issue(tmp.path(), Role::Admin, "a", &[], &[], 1).unwrap_err();
        assert!(matches!(err, PkiError::KeyPermissions { .. }), "{err}");
    }

    #[test]
    fn issue_validates_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let err = issue(tmp.path(), Role::Admin, "a", &[], &[], 1).unwrap_err();
        assert!(err.to_string().contains("vipsharectl certs init"), "{err}");
        init_ca(tmp.path(), "prod", 10).unwrap();
        for (role, name) in [
            (Role::Controller, "one"),
            (Role::Admin, "../etc"),
            (Role::Admin, ""),
        ] {
            assert!(issue(tmp.path(), role, name, &[], &[], 1).is_err());
        }
        let err = issue(tmp.path(), Role::Admin, "a", &[], &["bad host".into()], 1).unwrap_err();
        assert!(err.to_string().contains("DNS"), "{err}");
        assert!(issue(tmp.path(), Role::Admin, "a", &[], &[], 0).is_err());
        assert!(init_ca(&tmp.path().join("x"), "bad/cluster", 1).is_err());
        // Nothing half-written by the failures above.
        assert!(!tmp.path().join("admin-a.key").exists());
    }
}
