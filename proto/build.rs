//! Compiles `nexus/v1/*.proto` with protox (pure Rust, so no system `protoc`
//! is needed) and keeps the public API's encoded descriptor set for gRPC
//! reflection.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "nexus/v1/workflow.proto",
    "nexus/v1/operations.proto",
    "nexus/v1/internal.proto",
];
/// What clients see by reflection.
const PUBLIC: &[&str] = &["nexus/v1/workflow.proto", "nexus/v1/operations.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves the public contract only: the internal stream
    // messages are no client's business.
    let public = protox::compile(PUBLIC, ["."])?;
    std::fs::write(out_dir.join("nexus_public_descriptor.bin"), public.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Boxed: tasks are written without it now (it names its phase in
        // the run's pipeline instead), and a worker keeps each running
        // task's message through its model call, so inline the empty slot
        // cost 216 bytes per call in flight.
        .boxed(".nexus.internal.v1.PhaseTask.spec")
        .compile_fds(descriptors)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
