//! Certificate tooling: a per-cluster CA and the leaf certificates that carry every
//! process's identity as a SAN URI `vipshare://CLUSTER/ROLE/NAME`.
//!
//! Layout of a certificate directory: `ca.crt`, `ca.key`, and one `ROLE-NAME.crt` /
//! `ROLE-NAME.key` pair per issued identity. Keys are PKCS#8 PEM, mode 0600.
//!
//! Rotation: [`renew`] re-issues an identity in place (same SANs, new key), replacing
//! both files atomically; [`rotate_ca`] puts a new CA in front of the old one in
//! `ca.crt` (so both are trusted while leaves are renewed) and [`prune_ca`] drops
//! the old one afterwards. Revocation is by certificate serial ([`cert_serial`]).
//!
//! Cluster ID: `certs init` draws a random [`ClusterId`] and writes it into the CA as a
//! second SAN URI `urn:vipshare:cluster-id:HEX`; every leaf the CA signs (and every CA
//! a rotation creates) carries the same URI. Names like "prod" repeat across clusters,
//! the ID does not: controllers record it in their data directory and refuse another.

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

/// Where [`rotate_ca`] keeps the previous CA key until [`prune_ca`].
pub const OLD_CA_KEY_FILE: &str = "ca.key.old";

/// Prefix of the SAN URI carrying the [`ClusterId`].
pub const CLUSTER_ID_URN: &str = "urn:vipshare:cluster-id:";

/// Role and name of the CA's own URI, which records the cluster it belongs to.
const CA_URI_TAIL: &str = "ca/ca";
/// Issued certificates start this long in the past to tolerate clock skew between hosts.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// The random identity of one cluster (128 bits, lowercase hex), fixed at `certs init`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId(String);

impl ClusterId {
    /// A fresh ID from the system's random source.
    pub fn generate() -> io::Result<ClusterId> {
        let mut bytes = [0u8; 16];
        File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(ClusterId(
            bytes.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn to_uri(&self) -> String {
        format!("{CLUSTER_ID_URN}{}", self.0)
    }
}

impl FromStr for ClusterId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(ClusterId(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is not a cluster ID (32 lowercase hex digits)"
            ))
        }
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The cluster ID among a certificate's SAN names, if it carries one.
fn find_cluster_id(names: &[GeneralName<'_>]) -> Result<Option<ClusterId>, String> {
    let ids: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix(CLUSTER_ID_URN),
            _ => None,
        })
        .collect();
    match ids.as_slice() {
        [] => Ok(None),
        [id] => id.parse().map(Some),
        many => Err(format!("several cluster IDs: {many:?}")),
    }
}

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
    let id = ClusterId::generate().map_err(PkiError::io(
        "read random bytes from",
        Path::new("/dev/urandom"),
    ))?;
    let (cert_pem, key_pem) = new_ca(cluster, &id, validity)?;
    write_pair(&files, &cert_pem, &key_pem)?;
    Ok(files)
}

fn new_ca(
    cluster: &str,
    id: &ClusterId,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "CA key",
        source,
    })?;
    let mut params = CertificateParams::default();
    // A per-CA tag in the subject: verifiers pick trust anchors by subject, so two CAs
    // with the same name would report a foreign CA as a bad signature, not unknown.
    // It also keeps an old and a new CA apart in one bundle during a CA rotation.
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
    params.subject_alt_names = vec![
        uri_san(&format!("{URI_SCHEME}://{cluster}/{CA_URI_TAIL}"))?,
        uri_san(&id.to_uri())?,
    ];
    // Path length 0: the CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "CA certificate",
            source,
        })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issue a certificate for `role`/`name` signed by the CA in `dir`, valid as both TLS
/// server and client, with the identity URI plus the given IP and DNS SANs. Writes
/// `ROLE-NAME.crt` and `ROLE-NAME.key` (0600) and refuses to overwrite them.
/// Validity is capped at the CA's own expiry. When `ca.crt` is a bundle (during a
/// CA rotation) the first certificate, the one `ca.key` belongs to, signs.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    ips: &[IpAddr],
    dns: &[String],
    days: u32,
) -> Result<CertFiles, PkiError> {
    let signer = CaSigner::open(dir)?;
    let identity = Identity::new(signer.cluster.clone(), role, name)?;
    let files = leaf_files(dir, &identity);
    refuse_existing(&[&files.cert, &files.key])?;
    let (cert_pem, key_pem) = signer.sign_leaf(&identity, ips, dns, days)?;
    write_pair(&files, &cert_pem, &key_pem)?;
    Ok(files)
}

/// Re-issue the existing `ROLE-NAME.crt` in `dir` with a new key and serial: same
/// identity, same IP and DNS SANs (read from the current certificate), signed by the
/// CA in `dir` (the new one during a CA rotation), valid for `days` from now.
///
/// Both files are replaced atomically (written to 0600 temporary files, synced, then
/// renamed over the old ones, key first), so a daemon reloading at any moment reads
/// either the old or the new version of each file, never a partial one. A reload
/// that falls between the two renames sees a key that does not match the certificate
/// and keeps the old pair (see `tls::TlsReloader`). The files keep their owner when
/// the caller may set it (root).
pub fn renew(dir: &Path, role: Role, name: &str, days: u32) -> Result<CertFiles, PkiError> {
    let signer = CaSigner::open(dir)?;
    let wanted = Identity::new(signer.cluster.clone(), role, name)?;
    let files = leaf_files(dir, &wanted);
    if !files.cert.exists() {
        return Err(PkiError::invalid(
            &files.cert,
            format!(
                "nothing to renew (issue it first: `vipsharectl certs issue --dir {} --role {role} --name {name}`)",
                dir.display()
            ),
        ));
    }
    let current = describe_cert(&files.cert)?;
    let der = load_certs(&files.cert)?;
    let identity = cert_identity(&der[0])
        .map_err(|e| PkiError::invalid(&files.cert, format!("current certificate: {e}")))?;
    if identity.role != role || identity.name != name {
        return Err(PkiError::invalid(
            &files.cert,
            format!("holds identity {identity}, not {role}/{name}"),
        ));
    }
    if identity.cluster != signer.cluster {
        return Err(PkiError::invalid(
            &files.cert,
            format!(
                "belongs to cluster {:?} but the CA in {} is for {:?}",
                identity.cluster,
                dir.display(),
                signer.cluster
            ),
        ));
    }
    let (cert_pem, key_pem) = signer.sign_leaf(&identity, &current.ips, &current.dns, days)?;
    // Key first: a reader between the renames gets old cert + new key, a mismatch
    // rustls detects, rather than a new cert with an old key it might not.
    write_atomic(&files.key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&files.cert, cert_pem.as_bytes(), 0o644)?;
    Ok(files)
}

/// Start a CA rotation in `dir`: create a new CA for the same cluster, move the old
/// key to `ca.key.old`, and write `ca.crt` as a bundle with the new CA first and the
/// old one(s) after it. Daemons that reload the bundle then trust both, leaves can be
/// renewed one by one ([`renew`] signs with the new CA), and [`prune_ca`] finishes.
pub fn rotate_ca(dir: &Path, days: u32) -> Result<CertFiles, PkiError> {
    let validity = validity(days)?;
    let files = CertFiles {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    let old_key_path = dir.join(OLD_CA_KEY_FILE);
    refuse_existing(&[&old_key_path]).map_err(|_| {
        PkiError::invalid(
            &old_key_path,
            "a CA rotation is already in progress; finish it with `vipsharectl certs ca-prune` first",
        )
    })?;
    let signer = CaSigner::open(dir)?;
    let old_bundle = read_file(&files.cert)?;
    let old_key = read_key_pem(&files.key)?;
    // A CA from before cluster IDs gets one now; its leaves get it when renewed.
    let id = match &signer.cluster_id {
        Some(id) => id.clone(),
        None => ClusterId::generate().map_err(PkiError::io(
            "read random bytes from",
            Path::new("/dev/urandom"),
        ))?,
    };
    let (cert_pem, key_pem) = new_ca(&signer.cluster, &id, validity)?;
    let mut bundle = cert_pem;
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(&old_bundle);
    write_new(&old_key_path, &old_key, 0o600)?;
    write_atomic(&files.key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&files.cert, bundle.as_bytes(), 0o644)?;
    Ok(files)
}

/// Finish a CA rotation: `ca.crt` keeps only its first (the current) CA and
/// `ca.key.old` is deleted. Run it once every leaf was renewed and every daemon
/// reloaded; certificates of the old CA are refused from then on.
pub fn prune_ca(dir: &Path) -> Result<CertFiles, PkiError> {
    let files = CertFiles {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    // Refuses a CA whose key does not sign for it.
    CaSigner::open(dir)?;
    let pem = read_file(&files.cert)?;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let first_pem = pem
        .find(BEGIN)
        .and_then(|start| {
            let end = start + pem[start..].find(END)? + END.len();
            Some(format!("{}\n", &pem[start..end]))
        })
        .ok_or_else(|| PkiError::invalid(&files.cert, "contains no PEM certificate"))?;
    // What stays must still be the CA that signs.
    CaInfo::parse(&files.cert, &first_cert(&files.cert, &first_pem)?)?;
    write_atomic(&files.cert, first_pem.as_bytes(), 0o644)?;
    let old = dir.join(OLD_CA_KEY_FILE);
    match fs::remove_file(&old) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(PkiError::io("remove", &old)(e)),
    }
    Ok(files)
}

fn leaf_files(dir: &Path, identity: &Identity) -> CertFiles {
    let stem = identity.file_stem();
    CertFiles {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    }
}

/// The CA of a certificate directory, ready to sign: its first certificate and the
/// key, checked to belong together.
struct CaSigner {
    cluster: String,
    cluster_id: Option<ClusterId>,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl CaSigner {
    fn open(dir: &Path) -> Result<Self, PkiError> {
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
        let ca_key = load_key_pair(&ca_key_path)?;
        if rcgen::PublicKeyData::der_bytes(&ca_key) != ca.public_key.as_slice() {
            return Err(PkiError::invalid(
                &ca_key_path,
                format!(
                    "is not the key of the (first) CA certificate in {}",
                    ca_cert_path.display()
                ),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|e| {
            PkiError::invalid(&ca_cert_path, format!("unusable CA certificate: {e}"))
        })?;
        Ok(CaSigner {
            cluster: ca.cluster,
            cluster_id: ca.cluster_id,
            not_after: ca.not_after,
            issuer,
        })
    }

    /// PEM certificate and key of a new leaf for `identity`.
    fn sign_leaf(
        &self,
        identity: &Identity,
        ips: &[IpAddr],
        dns: &[String],
        days: u32,
    ) -> Result<(String, String), PkiError> {
        let (not_before, mut not_after) = validity(days)?;
        let mut sans = vec![uri_san(&identity.to_uri())?];
        if let Some(id) = &self.cluster_id {
            sans.push(uri_san(&id.to_uri())?);
        }
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
        if not_after > self.not_after {
            not_after = self.not_after;
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
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "certificate",
                source,
            })?;
        Ok((cert.pem(), key.serialize_pem()))
    }
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
    /// SAN URIs other than the cluster ID's.
    pub uris: Vec<String>,
    /// The cluster ID SAN, when the certificate carries one.
    pub cluster_id: Option<ClusterId>,
    pub ips: Vec<IpAddr>,
    pub dns: Vec<String>,
    pub is_ca: bool,
    /// Serial number in the form revocation uses (see [`cert_serial`]).
    pub serial: String,
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
        cluster_id: find_cluster_id(&names).map_err(|e| PkiError::invalid(path, e))?,
        ips: Vec::new(),
        dns: Vec::new(),
        is_ca: cert.is_ca(),
        serial: serial_hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        expires: cert.validity().not_after.to_string(),
    };
    for name in names {
        match name {
            GeneralName::URI(u) if u.starts_with(CLUSTER_ID_URN) => {}
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

/// The cluster ID of a CA certificate (PEM file); `None` for a CA made before IDs.
pub fn ca_cluster_id(path: &Path) -> Result<Option<ClusterId>, PkiError> {
    let pem = read_file(path)?;
    let der = first_cert(path, &pem)?;
    Ok(CaInfo::parse(path, &der)?.cluster_id)
}

/// What a daemon's own certificate says about it, once checked against the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnCert {
    pub identity: Identity,
    pub cluster_id: ClusterId,
    pub ips: Vec<IpAddr>,
    pub dns: Vec<String>,
}

/// Verify that the first certificate in `cert` chains to a CA in `ca` and is valid
/// now (not expired, not yet valid, or signed by another CA are named as such).
/// Returns the certificate chain and the CA certificates.
#[allow(clippy::type_complexity)]
pub fn verify_chain(
    cert: &Path,
    ca: &Path,
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), PkiError> {
    let cas = load_certs(ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for der in &cas {
        roots
            .add(der.clone())
            .map_err(|e| PkiError::invalid(ca, format!("unusable CA certificate: {e}")))?;
    }
    let chain = load_certs(cert)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .map_err(|e| PkiError::invalid(ca, format!("cannot build a verifier: {e}")))?;
    verifier
        .verify_client_cert(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
        .map_err(|e| {
            PkiError::invalid(
                cert,
                format!("is not valid under the cluster CA {}: {e}", ca.display()),
            )
        })?;
    Ok((chain, cas))
}

/// Check a daemon's own certificate before it serves: it must chain to the CA in
/// `ca` (a certificate from another cluster's CA is otherwise only noticed when
/// every peer refuses it), carry a vipshare identity, and carry the CA's cluster ID.
pub fn check_own_cert(cert: &Path, ca: &Path) -> Result<OwnCert, PkiError> {
    let (chain, cas) = verify_chain(cert, ca)?;
    let identity = cert_identity(&chain[0]).map_err(|e| PkiError::invalid(cert, e.to_string()))?;
    let summary = describe_cert(cert)?;
    let ca_id = ca_cluster_id(ca)?;
    let cluster_id = match (summary.cluster_id, ca_id) {
        (Some(mine), Some(theirs)) if mine == theirs => mine,
        // During a CA rotation the leaf may still be signed by the old CA (listed
        // after the new one in the bundle); both carry the same ID.
        (Some(mine), _) if cas.len() > 1 => mine,
        (Some(mine), Some(theirs)) => {
            return Err(PkiError::invalid(
                cert,
                format!(
                    "carries cluster ID {mine}, but the CA {} is cluster {theirs}",
                    ca.display()
                ),
            ))
        }
        (None, _) | (_, None) => {
            return Err(PkiError::invalid(
                cert,
                "carries no cluster ID (issued before cluster IDs existed); create the PKI \
                 with `vipsharectl certs init` or rotate the CA and renew this certificate",
            ))
        }
    };
    Ok(OwnCert {
        identity,
        cluster_id,
        ips: summary.ips,
        dns: summary.dns,
    })
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

/// The serial number of a DER certificate as revocation names it: lowercase hex,
/// no separators, no leading zeros (`0a:1b:...` from openssl becomes `a1b...`).
pub fn cert_serial(der: &[u8]) -> Result<String, CertIdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertIdentityError::Unparsable(e.to_string()))?;
    Ok(serial_hex(cert.raw_serial()))
}

fn serial_hex(raw: &[u8]) -> String {
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Longest serial accepted, in hex digits (RFC 5280 allows 20 octets; some CAs
/// emit 21 with a sign byte).
pub const MAX_SERIAL_HEX: usize = 42;

/// A serial as an operator may type it (`0A:1B:..`, `0x0a1b..`, `a1b..`) in the
/// canonical form of [`cert_serial`].
pub fn normalize_serial(s: &str) -> Result<String, PkiError> {
    let bad = |reason: &str| PkiError::Argument(format!("serial {s:?} {reason}"));
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let digits: String = t
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.is_empty() {
        return Err(bad("is empty"));
    }
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("is not hexadecimal"));
    }
    if digits.len() > MAX_SERIAL_HEX {
        return Err(bad("is longer than a certificate serial can be"));
    }
    let trimmed = digits.trim_start_matches('0');
    Ok(if trimmed.is_empty() { "0" } else { trimmed }.to_string())
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
    cluster_id: Option<ClusterId>,
    not_after: OffsetDateTime,
    /// The public key bits, to check the CA key belongs to this certificate.
    public_key: Vec<u8>,
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
        let cluster_id = find_cluster_id(&names).map_err(|e| PkiError::invalid(path, e))?;
        Ok(CaInfo {
            cluster: cluster.to_string(),
            cluster_id,
            not_after: cert.validity().not_after.to_datetime(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
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

/// Replace `path` atomically with `contents`: written to a temporary file in the same
/// directory (created 0600, so a key is never readable by others, not even briefly),
/// synced, given `mode` (and the previous file's owner where permitted), then renamed
/// over `path`. Readers see the old or the new file, never a mix.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| PkiError::Argument(format!("{} is not a file path", path.display())))?;
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{nanos}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let previous = fs::metadata(path).ok();
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(&tmp).map_err(PkiError::io("create", &tmp))?;
    let written = (|| -> io::Result<()> {
        file.write_all(contents)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            if let Some(prev) = &previous {
                // Best effort: only root may give a file away; otherwise the owner
                // is the caller, as it was for the file being replaced.
                let _ = std::os::unix::fs::fchown(&file, Some(prev.uid()), Some(prev.gid()));
            }
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        #[cfg(not(unix))]
        let _ = (mode, &previous);
        file.sync_all()
    })();
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::io("write", &tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::io("replace", path)(e));
    }
    // Make the rename itself durable.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
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

    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn renew_keeps_identity_and_sans_and_replaces_both_files() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init_ca(dir, "prod", 30).unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let files = issue(dir, Role::Controller, "2", &[ip], &["c2.example".into()], 5).unwrap();
        let before = describe_cert(&files.cert).unwrap();
        let old_key = fs::read(&files.key).unwrap();
        let listing = files_in(dir);

        let renewed = renew(dir, Role::Controller, "2", 20).unwrap();
        assert_eq!(renewed, files);
        let after = describe_cert(&files.cert).unwrap();
        assert_eq!(
            (&after.uris, &after.ips, &after.dns, &after.subject),
            (&before.uris, &before.ips, &before.dns, &before.subject)
        );
        assert_ne!(after.serial, before.serial);
        assert!(after.not_after > before.not_after);
        assert_ne!(fs::read(&files.key).unwrap(), old_key);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&files.key), mode(&files.cert)), (0o600, 0o644));
        // No temporary file left behind; the pair goes together.
        assert_eq!(files_in(dir), listing);
        let der = load_certs(&files.cert).unwrap();
        let key = load_key(&files.key).unwrap();
        rustls::sign::CertifiedKey::from_der(der, key, &rustls::crypto::ring::default_provider())
            .unwrap();
    }

    #[test]
    fn renew_refuses_what_it_cannot_reproduce() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init_ca(dir, "prod", 30).unwrap();
        let err = renew(dir, Role::Admin, "alice", 10).unwrap_err();
        assert!(err.to_string().contains("certs issue"), "{err}");
        // A file that holds another identity than its name says.
        let bob = issue(dir, Role::Admin, "bob", &[], &[], 10).unwrap();
        fs::copy(&bob.cert, dir.join("admin-alice.crt")).unwrap();
        let err = renew(dir, Role::Admin, "alice", 10).unwrap_err();
        assert!(
            err.to_string().contains("vipshare://prod/admin/bob"),
            "{err}"
        );
        assert!(!dir.join("admin-alice.key").exists());
    }

    #[test]
    fn ca_key_must_belong_to_the_ca_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init_ca(&a, "prod", 30).unwrap();
        init_ca(&b, "prod", 30).unwrap();
        fs::remove_file(a.join(CA_KEY_FILE)).unwrap();
        fs::copy(b.join(CA_KEY_FILE), a.join(CA_KEY_FILE)).unwrap();
        let err = issue(&a, Role::Admin, "x", &[], &[], 1).unwrap_err();
        assert!(err.to_string().contains("is not the key of"), "{err}");
    }

    #[test]
    fn ca_rotation_bundles_then_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init_ca(dir, "prod", 30).unwrap();
        let old_ca = describe_cert(&dir.join(CA_CERT_FILE)).unwrap();
        let leaf = issue(dir, Role::Admin, "alice", &[], &[], 10).unwrap();
        assert_eq!(describe_cert(&leaf.cert).unwrap().issuer, old_ca.subject);

        rotate_ca(dir, 60).unwrap();
        let bundle = load_certs(&dir.join(CA_CERT_FILE)).unwrap();
        assert_eq!(bundle.len(), 2);
        let new_ca = describe_cert(&dir.join(CA_CERT_FILE)).unwrap();
        assert_ne!(new_ca.subject, old_ca.subject);
        assert_eq!(ca_cluster(&dir.join(CA_CERT_FILE)).unwrap(), "prod");
        assert!(dir.join(OLD_CA_KEY_FILE).exists());
        // Renewal now signs with the new CA.
        renew(dir, Role::Admin, "alice", 10).unwrap();
        assert_eq!(describe_cert(&leaf.cert).unwrap().issuer, new_ca.subject);
        // One rotation at a time.
        let err = rotate_ca(dir, 60).unwrap_err();
        assert!(err.to_string().contains("ca-prune"), "{err}");

        prune_ca(dir).unwrap();
        let bundle = load_certs(&dir.join(CA_CERT_FILE)).unwrap();
        assert_eq!(bundle.len(), 1);
        assert_eq!(describe_cert(&dir.join(CA_CERT_FILE)).unwrap(), new_ca);
        assert!(!dir.join(OLD_CA_KEY_FILE).exists());
        issue(dir, Role::Admin, "bob", &[], &[], 10).unwrap();
    }

    #[test]
    fn cluster_id_is_random_carried_by_leaves_and_kept_by_rotation() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init_ca(&a, "prod", 30).unwrap();
        init_ca(&b, "prod", 30).unwrap();
        let id_a = ca_cluster_id(&a.join(CA_CERT_FILE)).unwrap().unwrap();
        let id_b = ca_cluster_id(&b.join(CA_CERT_FILE)).unwrap().unwrap();
        assert_ne!(id_a, id_b, "two clusters named prod share an ID");
        assert_eq!(id_a.as_str().parse::<ClusterId>().unwrap(), id_a);

        let leaf = issue(&a, Role::Controller, "1", &[], &[], 10).unwrap();
        let own = check_own_cert(&leaf.cert, &a.join(CA_CERT_FILE)).unwrap();
        assert_eq!(own.cluster_id, id_a);
        assert_eq!(
            own.identity,
            Identity::new("prod", Role::Controller, "1").unwrap()
        );

        rotate_ca(&a, 60).unwrap();
        assert_eq!(
            ca_cluster_id(&a.join(CA_CERT_FILE)).unwrap(),
            Some(id_a.clone())
        );
        // The old leaf is still valid under the bundle, and so is a renewed one.
        check_own_cert(&leaf.cert, &a.join(CA_CERT_FILE)).unwrap();
        renew(&a, Role::Controller, "1", 10).unwrap();
        assert_eq!(describe_cert(&leaf.cert).unwrap().cluster_id, Some(id_a));
    }

    #[test]
    fn own_cert_from_another_ca_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init_ca(&a, "prod", 30).unwrap();
        init_ca(&b, "prod", 30).unwrap();
        let leaf = issue(&b, Role::Controller, "1", &[], &[], 10).unwrap();
        let err = check_own_cert(&leaf.cert, &a.join(CA_CERT_FILE))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid under the cluster CA"), "{err}");
        assert!(err.contains("controller-1.crt"), "{err}");
    }

    #[test]
    fn serials_have_one_spelling() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), "prod", 30).unwrap();
        let f = issue(tmp.path(), Role::Admin, "a", &[], &[], 1).unwrap();
        let der = load_certs(&f.cert).unwrap();
        let serial = cert_serial(&der[0]).unwrap();
        assert_eq!(describe_cert(&f.cert).unwrap().serial, serial);
        assert!(!serial.starts_with('0') && serial.len() <= MAX_SERIAL_HEX);
        let colons: Vec<String> = format!("{serial:0>40}")
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        assert_eq!(normalize_serial(&colons.join(":")).unwrap(), serial);
        assert_eq!(normalize_serial(&format!("0x{serial}")).unwrap(), serial);
        assert_eq!(normalize_serial("00").unwrap(), "0");
        for bad in ["", "0x", "12g4", &"1".repeat(MAX_SERIAL_HEX + 1)] {
            assert!(normalize_serial(bad).is_err(), "{bad:?}");
        }
    }
}
