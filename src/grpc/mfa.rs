//! The MfaService handlers: thin, as TokenService's; the rules are in `mfa`.

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use crate::mfa::{self, Mfa, Verdict};
use crate::pb;
use crate::pb::mfa_service_server::MfaService;

pub struct MfaApi {
    mfa: Arc<Mfa>,
}

impl MfaApi {
    pub fn new(mfa: Arc<Mfa>) -> MfaApi {
        MfaApi { mfa }
    }
}

#[tonic::async_trait]
impl MfaService for MfaApi {
    async fn begin_totp_enrollment(
        &self,
        request: Request<pb::BeginTotpEnrollmentRequest>,
    ) -> Result<Response<pb::BeginTotpEnrollmentResponse>, Status> {
        let req = request.into_inner();
        let begun = self.mfa.begin(&req.subject, &req.account_label).await?;
        Ok(Response::new(pb::BeginTotpEnrollmentResponse {
            secret: begun.secret,
            otpauth_uri: begun.uri,
            expires_at: Some(begun.expires_at.into()),
        }))
    }

    async fn confirm_totp_enrollment(
        &self,
        request: Request<pb::ConfirmTotpEnrollmentRequest>,
    ) -> Result<Response<pb::ConfirmTotpEnrollmentResponse>, Status> {
        let req = request.into_inner();
        let backup_codes = self.mfa.confirm(&req.subject, &req.code).await?;
        Ok(Response::new(pb::ConfirmTotpEnrollmentResponse {
            backup_codes,
        }))
    }

    async fn verify_totp(
        &self,
        request: Request<pb::VerifyTotpRequest>,
    ) -> Result<Response<pb::VerifyTotpResponse>, Status> {
        let req = request.into_inner();
        let verdict = self.mfa.verify(&req.subject, &req.code).await?;
        crate::telemetry::record_mfa("totp", label(verdict));
        Ok(Response::new(pb::VerifyTotpResponse {
            valid: verdict == Verdict::Valid,
            reason: reason(verdict).into(),
        }))
    }

    async fn verify_backup_code(
        &self,
        request: Request<pb::VerifyBackupCodeRequest>,
    ) -> Result<Response<pb::VerifyBackupCodeResponse>, Status> {
        let req = request.into_inner();
        let (verdict, left) = self.mfa.verify_backup(&req.subject, &req.code).await?;
        crate::telemetry::record_mfa("backup_code", label(verdict));
        Ok(Response::new(pb::VerifyBackupCodeResponse {
            valid: verdict == Verdict::Valid,
            reason: reason(verdict).into(),
            backup_codes_remaining: left,
        }))
    }

    async fn get_mfa_status(
        &self,
        request: Request<pb::GetMfaStatusRequest>,
    ) -> Result<Response<pb::GetMfaStatusResponse>, Status> {
        let status = self.mfa.status(&request.into_inner().subject).await?;
        Ok(Response::new(pb::GetMfaStatusResponse {
            enrolled: status.enrolled_at.is_some(),
            enrolled_at: status.enrolled_at.map(SystemTime::into),
            backup_codes_remaining: status.backup_codes,
            pending_expires_at: status.pending_until.map(SystemTime::into),
        }))
    }

    async fn disable_mfa(
        &self,
        request: Request<pb::DisableMfaRequest>,
    ) -> Result<Response<pb::DisableMfaResponse>, Status> {
        let disabled = self.mfa.disable(&request.into_inner().subject).await?;
        Ok(Response::new(pb::DisableMfaResponse { disabled }))
    }

    async fn regenerate_backup_codes(
        &self,
        request: Request<pb::RegenerateBackupCodesRequest>,
    ) -> Result<Response<pb::RegenerateBackupCodesResponse>, Status> {
        let subject = request.into_inner().subject;
        let backup_codes = self.mfa.regenerate_backup_codes(&subject).await?;
        Ok(Response::new(pb::RegenerateBackupCodesResponse {
            backup_codes,
        }))
    }
}

fn reason(verdict: Verdict) -> pb::MfaInvalidReason {
    match verdict {
        Verdict::Valid => pb::MfaInvalidReason::Unspecified,
        Verdict::WrongCode => pb::MfaInvalidReason::WrongCode,
        Verdict::Replayed => pb::MfaInvalidReason::Replayed,
        Verdict::NotEnrolled => pb::MfaInvalidReason::NotEnrolled,
    }
}

/// The metric label of a verdict.
fn label(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Valid => "valid",
        Verdict::WrongCode => "wrong_code",
        Verdict::Replayed => "replayed",
        Verdict::NotEnrolled => "not_enrolled",
    }
}

impl From<mfa::Error> for Status {
    fn from(err: mfa::Error) -> Status {
        match err {
            mfa::Error::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
            mfa::Error::FailedPrecondition(_) => Status::failed_precondition(err.to_string()),
            mfa::Error::Unauthenticated(_) => Status::unauthenticated(err.to_string()),
            mfa::Error::Limited(retry_after) => {
                let mut status = Status::resource_exhausted(err.to_string());
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                status
                    .metadata_mut()
                    .insert("retry-after", seconds.to_string().parse().expect("digits"));
                status
            }
            mfa::Error::Sealed(e) => {
                tracing::error!(error = %e, "MFA: a stored secret does not open");
                match e {
                    mfa::seal::OpenError::UnknownKey(_) => {
                        Status::failed_precondition(e.to_string())
                    }
                    mfa::seal::OpenError::Corrupt => {
                        Status::internal("a stored MFA secret does not open")
                    }
                }
            }
            mfa::Error::Store(e) => super::store_unavailable(e),
        }
    }
}
