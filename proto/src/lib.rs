//! The vipshare wire: generated gRPC code for the three services (Raft transport,
//! Agent API, Admin API), the mTLS transport every connection uses (`tls`), and the
//! certificate tooling that mints identities (`pki`).

pub mod pki;
pub mod priority;
pub mod telemetry;
pub mod tls;

/// Generated from `proto/vipshare.proto`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("vipshare.v1");
}

/// Wire protocol version carried in every message. Bump on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message any vipshare service accepts or sends (snapshots included).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Refuse a request whose protocol version this build does not speak.
#[allow(clippy::result_large_err)]
pub fn check_version(v: u32) -> Result<(), tonic::Status> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(tonic::Status::failed_precondition(format!(
            "protocol version {v} not supported (this build speaks {PROTOCOL_VERSION})"
        )))
    }
}
