//! The gRPC edge: thin handlers that convert, call the domain and map the result, and the one
//! place where domain errors become gRPC statuses.

mod convert;
mod envoy_authz;
mod envoy_rls;
mod mfa;
mod wire;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::token_service_server::TokenService;
use crate::ratelimit::{self, RateLimiter};
use crate::telemetry;
use crate::tokens::{self, IssueParams, RevokeTarget, Tokens, Verdict};

use crate::sessions::Sessions;
use convert::{CreateSessionParams, ValidateParams};
pub use convert::{json_to_struct, struct_to_json};
pub use envoy_authz::{AuthorizationServer, EnvoyAuthz};
pub use envoy_rls::EnvoyRls;
pub use mfa::MfaApi;
pub use wire::request_errors;

pub struct TokenApi {
    tokens: Arc<Tokens>,
    limits: Arc<RateLimiter>,
    sessions: Arc<Sessions>,
}

impl TokenApi {
    pub fn new(tokens: Arc<Tokens>, limits: Arc<RateLimiter>, sessions: Arc<Sessions>) -> TokenApi {
        TokenApi {
            tokens,
            limits,
            sessions,
        }
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let params = IssueParams::try_from(request.into_inner())?;
        let issued = self.tokens.issue(params).await?;
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
        telemetry::record_validation(match &verdict {
            Verdict::Valid(_) => "valid",
            Verdict::Invalid(reason) => reason.label(),
        });
        Ok(Response::new(verdict.into()))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let target = RevokeTarget::try_from(request.into_inner())?;
        let revoked = self.tokens.revoke(target).await?;
        Ok(Response::new(pb::RevokeResponse {
            newly_revoked: revoked.newly,
            sessions_deleted: revoked.sessions_deleted,
        }))
    }

    async fn check_rate_limit(
        &self,
        request: Request<pb::CheckRateLimitRequest>,
    ) -> Result<Response<pb::CheckRateLimitResponse>, Status> {
        let req = request.into_inner();
        let (policy, key) = convert::rate_limit_key(req.policy, req.key)?;
        let decision = self
            .limits
            .check(&policy, &key, req.cost.unwrap_or(1))
            .await?;
        telemetry::record_rate_limit(&policy, decision.allowed);
        Ok(Response::new(decision.into()))
    }

    async fn reset_rate_limit(
        &self,
        request: Request<pb::ResetRateLimitRequest>,
    ) -> Result<Response<pb::ResetRateLimitResponse>, Status> {
        let req = request.into_inner();
        let (policy, key) = convert::rate_limit_key(req.policy, req.key)?;
        self.limits.reset(&policy, &key).await?;
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

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let token = convert::refresh_token(request.into_inner().refresh_token)?;
        let refreshed = self.tokens.refresh(&token).await?;
        Ok(Response::new(refreshed.into()))
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let p = CreateSessionParams::try_from(request.into_inner())?;
        let session = self.sessions.create(p.subject, p.ttl, p.metadata).await?;
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some(session.into()),
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let id = convert::session_id(request.into_inner().session_id)?;
        let session = self.sessions.get(&id).await?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(session.into()),
        }))
    }

    async fn touch_session(
        &self,
        request: Request<pb::TouchSessionRequest>,
    ) -> Result<Response<pb::TouchSessionResponse>, Status> {
        let id = convert::session_id(request.into_inner().session_id)?;
        let session = self.sessions.touch(&id).await?;
        Ok(Response::new(pb::TouchSessionResponse {
            session: Some(session.into()),
        }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let id = convert::session_id(request.into_inner().session_id)?;
        let deleted = self.sessions.delete(&id).await?;
        Ok(Response::new(pb::DeleteSessionResponse { deleted }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let subject = convert::subject(request.into_inner().subject)?;
        let sessions = self.sessions.list(&subject).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions.into_iter().map(Into::into).collect(),
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
            tokens::Error::NotFound(_) => Status::not_found(err.to_string()),
            tokens::Error::Unauthenticated(_) => Status::unauthenticated(err.to_string()),
            tokens::Error::Store(e) => store_unavailable(e),
            tokens::Error::Signing(detail) => {
                tracing::error!(error = %detail, "signing failed");
                Status::internal("signing failed")
            }
            tokens::Error::SignerUnavailable(detail) => {
                tracing::error!(error = %detail, "the signing key did not sign");
                Status::unavailable("the signing key does not sign")
            }
        }
    }
}
