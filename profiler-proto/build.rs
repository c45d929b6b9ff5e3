//! Generates the protocol code with tonic/prost. The .proto files are parsed
//! by protox (pure Rust), so no system `protoc` is needed.
fn main() -> anyhow::Result<()> {
    let protos = [
        "proto/profiler/v1/ingest.proto",
        "proto/pprof/profile.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
