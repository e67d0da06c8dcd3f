//! The gRPC edge: thin handlers that convert, call the domain and map the result, and the one
//! place where domain errors become gRPC statuses.

mod convert;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::token_service_server::TokenService;
use crate::ratelimit::{self, RateLimiter};
use crate::tokens::{self, IssueParams, RevokeTarget, Tokens};

use convert::ValidateParams;
pub use convert::{json_to_struct, struct_to_json};

pub struct TokenApi {
    tokens: Arc<Tokens>,
    limits: Arc<RateLimiter>,
}

impl TokenApi {
    pub fn new(tokens: Arc<Tokens>, limits: Arc<RateLimiter>) -> TokenApi {
        TokenApi { tokens, limits }
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let params = IssueParams::try_from(request.into_inner())?;
        let issued = self.tokens.issue(params)?;
        Ok(Response::new(issued.into()))
    }

    async fn validate(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let p = ValidateParams::try_from(request.into_inner())?;
        let verdict = self
            .tokens
            .validate(&p.token, p.audience.as_deref(), p.kind)
            .await?;
        Ok(Response::new(verdict.into()))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let target = RevokeTarget::try_from(request.into_inner())?;
        let newly_revoked = self.tokens.revoke(target).await?;
        Ok(Response::new(pb::RevokeResponse { newly_revoked }))
    }

    async fn check_rate_limit(
        &self,
        request: Request<pb::CheckRateLimitRequest>,
    ) -> Result<Response<pb::CheckRateLimitResponse>, Status> {
        let req = request.into_inner();
        let cost = req.cost.unwrap_or(1);
        let decision = self.limits.check(&req.policy, &req.key, cost).await?;
        Ok(Response::new(decision.into()))
    }

    async fn reset_rate_limit(
        &self,
        request: Request<pb::ResetRateLimitRequest>,
    ) -> Result<Response<pb::ResetRateLimitResponse>, Status> {
        let req = request.into_inner();
        self.limits.reset(&req.policy, &req.key).await?;
        Ok(Response::new(pb::ResetRateLimitResponse {}))
    }

    async fn get_jwks(
        &self,
        _: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let keys = self.tokens.keys().current();
        Ok(Response::new(pb::GetJwksResponse {
            jwks_json: keys.jwks().to_owned(),
            active_key_id: keys.active().kid().to_owned(),
        }))
    }
}

impl From<ratelimit::Error> for Status {
    fn from(err: ratelimit::Error) -> Status {
        match err {
            ratelimit::Error::UnknownPolicy(_) => Status::not_found(err.to_string()),
            ratelimit::Error::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
            ratelimit::Error::Store(e) => store_unavailable(e),
        }
    }
}

/// A store that could not answer: the detail to the log, UNAVAILABLE to the caller.
fn store_unavailable(e: crate::store::StoreError) -> Status {
    tracing::warn!(backend = e.backend, error = %e.detail, "store call failed");
    Status::unavailable(format!("{} store unavailable", e.backend))
}

impl From<tokens::Error> for Status {
    fn from(err: tokens::Error) -> Status {
        match err {
            tokens::Error::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
            tokens::Error::Store(e) => store_unavailable(e),
            tokens::Error::Signing(detail) => {
                tracing::error!(error = %detail, "signing failed");
                Status::internal("signing failed")
            }
        }
    }
}
