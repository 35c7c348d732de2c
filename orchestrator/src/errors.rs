//! Errors of the orchestrator and the one place they become gRPC statuses.
//!
//! Messages say what the caller can do about the problem. Internal details
//! (Redis errors) are logged, not returned, and no message carries a secret.

use nexus_pipeline::ids::IdError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("workflow {0} not found (unknown, or expired after its retention period)")]
    NotFound(String),
    #[error("idempotency key {key:?} was already used for workflow {workflow_id} with a different plan")]
    IdempotencyMismatch { key: String, workflow_id: String },
    /// The request is well-formed but the workflow is not in a state that
    /// allows it (approving a run that does not wait, forking from a phase
    /// the parent has not finished).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A tenant's or the replica's limit: the message names it.
    #[error("{0}")]
    LimitReached(String),
    #[error("storage unavailable: {0}")]
    Storage(#[from] redis::RedisError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<IdError> for ApiError {
    fn from(error: IdError) -> Self {
        Self::InvalidArgument(format!("workflow_id: {error}"))
    }
}

impl From<nexus_pipeline::transition::LoadError> for ApiError {
    fn from(error: nexus_pipeline::transition::LoadError) -> Self {
        match error {
            nexus_pipeline::transition::LoadError::Storage(cause) => Self::Storage(cause),
            nexus_pipeline::transition::LoadError::Corrupt(what) => Self::Corrupt(what),
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(_) | ApiError::IdempotencyMismatch { .. } => {
                Status::invalid_argument(error.to_string())
            }
            ApiError::TooLarge(_) | ApiError::LimitReached(_) => Status::resource_exhausted(error.to_string()),
            ApiError::NotFound(_) => Status::not_found(error.to_string()),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
            ApiError::Storage(ref cause) => {
                tracing::error!(error = %cause, "redis command failed");
                Status::unavailable("workflow storage is unavailable; retry shortly")
            }
            ApiError::Corrupt(ref what) => {
                tracing::error!(%what, "corrupt stored data");
                Status::internal("stored workflow data could not be read")
            }
        }
    }
}
