// Uses the vendored protoc so a fresh machine needs no manual protoc install.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/vipshare.proto");
    tonic_prost_build::configure().compile_protos(&["proto/vipshare.proto"], &["proto"])?;
    Ok(())
}
