//! Optional bearer-token authentication, as a tonic interceptor so no
//! handler has to remember it.

use tonic::{Request, Status};

#[derive(Clone)]
pub struct BearerToken {
    expected: Option<String>,
}

impl BearerToken {
    /// An empty token counts as none, so `NEXUS_API_TOKEN=` turns auth off.
    pub fn new(token: Option<String>) -> Self {
        let token = token.filter(|token| !token.is_empty());
        Self {
            expected: token.map(|token| format!("Bearer {token}")),
        }
    }

    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong token: send metadata \"authorization: Bearer <token>\"",
            ))
        }
    }
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}
