//! The Nexus contract, generated from `proto/nexus/v1/*.proto` at build time.
//!
//! - [`v1`]: the public API (`WorkflowService`, and `OperationsService` for
//!   operators) that clients call and the events they watch. Stored events
//!   in Redis are these same messages.
//! - [`internal`]: what travels on the Redis Streams between orchestrators and
//!   phase workers (tasks and results). Versioned so old and new processes can
//!   share a stream during a rolling deploy.

/// Generated modules, nested like the proto packages so cross-package
/// references resolve.
mod generated {
    pub mod nexus {
        pub mod v1 {
            tonic::include_proto!("nexus.v1");
        }
        pub mod internal {
            pub mod v1 {
                tonic::include_proto!("nexus.internal.v1");
            }
        }
    }
}

pub use generated::nexus::internal::v1 as internal;
pub use generated::nexus::v1;

/// Encoded `FileDescriptorSet` of the public API (`nexus/v1/workflow.proto`,
/// `nexus/v1/operations.proto` and what they import), served by gRPC
/// reflection so `grpcurl` works without the proto files. The internal
/// stream messages are left out.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nexus_public_descriptor.bin"));

/// Version stamped on every stream message this build writes. 2: phase
/// tasks name their phase in the run's pipeline snapshot instead of
/// carrying it (a worker of version 1 would find no phase in them, so it
/// leaves them to a newer one).
pub const STREAM_MESSAGE_VERSION: u32 = 2;

/// A protobuf timestamp from milliseconds since the Unix epoch, the unit
/// Nexus stores in Redis.
pub fn timestamp_from_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The current time as a protobuf timestamp, to the microsecond (event
/// times are used to measure delivery latency).
pub fn timestamp_now() -> prost_types::Timestamp {
    timestamp_from_micros(unix_micros())
}

/// Microseconds since the Unix epoch.
pub fn unix_micros() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_micros() as i64
}

/// A protobuf timestamp from microseconds since the Unix epoch.
pub fn timestamp_from_micros(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}
