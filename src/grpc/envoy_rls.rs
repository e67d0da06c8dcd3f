//! Envoy's rate limit service, `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`:
//! each descriptor names one of the configured policies and a key, and is counted exactly as
//! CheckRateLimit counts, in the same store, so every node and every app share the count.
//!
//! The mapping (the README has it for operators): the entry whose key is `policy` names the
//! policy; the other entries make the key (see [`descriptor_key`]; the request's `domain`
//! when there are none). The hits are the descriptor's `hits_addend` when set (0 peeks), else
//! the request's (0 meaning 1).

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf;
use tonic::{Request, Response, Status};

use crate::ratelimit::{Policy, RateLimiter};
use crate::telemetry;

/// The descriptor entry that names the policy.
const POLICY_ENTRY: &str = "policy";

/// Most descriptors one request may carry.
const MAX_DESCRIPTORS: usize = 64;

pub struct EnvoyRls {
    limits: Arc<RateLimiter>,
}

impl EnvoyRls {
    pub fn new(limits: Arc<RateLimiter>) -> EnvoyRls {
        EnvoyRls { limits }
    }
}

/// One descriptor, checked and ready to count.
struct Counted<'a> {
    policy: &'a Policy,
    key: String,
    hits: u32,
}

#[tonic::async_trait]
impl RateLimitService for EnvoyRls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let req = request.into_inner();
        if req.descriptors.is_empty() || req.descriptors.len() > MAX_DESCRIPTORS {
            return Err(Status::invalid_argument(format!(
                "descriptors: {} given, 1 to {MAX_DESCRIPTORS} expected",
                req.descriptors.len()
            )));
        }
        let hits = if req.hits_addend == 0 {
            1
        } else {
            req.hits_addend
        };
        // Every descriptor is checked before any is counted: a bad one counts nothing.
        let counted = req
            .descriptors
            .iter()
            .enumerate()
            .map(|(i, d)| self.admit(i, d, &req.domain, hits))
            .collect::<Result<Vec<_>, Status>>()?;
        let mut statuses = Vec::with_capacity(counted.len());
        let mut retry_after = None;
        for c in &counted {
            let decision = self.limits.check(&c.policy.name, &c.key, c.hits).await?;
            telemetry::record_rate_limit(&c.policy.name, decision.allowed);
            if !decision.allowed {
                retry_after = retry_after.max(Some(decision.retry_after));
            }
            statuses.push(DescriptorStatus {
                code: if decision.allowed {
                    Code::Ok
                } else {
                    Code::OverLimit
                } as i32,
                current_limit: current_limit(c.policy),
                limit_remaining: decision.remaining,
                // Denied: until a request of this weight would pass; allowed: until the key
                // is back to its full allowance.
                duration_until_reset: Some(duration(if decision.allowed {
                    decision.reset_after
                } else {
                    decision.retry_after
                })),
                ..Default::default()
            });
        }
        let response_headers_to_add = retry_after
            .map(|wait| vec![super::envoy_authz::retry_after(wait)])
            .unwrap_or_default();
        Ok(Response::new(RateLimitResponse {
            overall_code: if retry_after.is_some() {
                Code::OverLimit
            } else {
                Code::Ok
            } as i32,
            statuses,
            response_headers_to_add,
            ..Default::default()
        }))
    }
}

impl EnvoyRls {
    fn admit<'a>(
        &'a self,
        i: usize,
        d: &RateLimitDescriptor,
        domain: &str,
        request_hits: u32,
    ) -> Result<Counted<'a>, Status> {
        let invalid = |why: String| Status::invalid_argument(format!("descriptors[{i}].{why}"));
        if d.limit.is_some() {
            return Err(invalid(
                "limit: overrides are not taken; the named policy sets the limit".to_owned(),
            ));
        }
        if d.is_negative_hits {
            return Err(invalid(
                "is_negative_hits: hits cannot be given back".to_owned(),
            ));
        }
        let mut policy = None;
        let mut key = Vec::new();
        for entry in &d.entries {
            if entry.key == POLICY_ENTRY {
                if policy.replace(entry.value.as_str()).is_some() {
                    return Err(invalid(format!("entries: more than one `{POLICY_ENTRY}`")));
                }
            } else {
                key.push((entry.key.as_str(), entry.value.as_str()));
            }
        }
        let Some(policy) = policy else {
            return Err(invalid(format!(
                "entries: no `{POLICY_ENTRY}` entry naming a rate-limit policy"
            )));
        };
        let key = if key.is_empty() {
            domain.to_owned()
        } else {
            descriptor_key(&key)
        };
        let hits = match &d.hits_addend {
            Some(h) => u32::try_from(h.value)
                .map_err(|_| invalid(format!("hits_addend: {} is out of range", h.value)))?,
            None => request_hits,
        };
        let admitted = self.limits.admit(policy, &key, hits);
        let policy = admitted.map_err(|e| {
            let status = Status::from(e);
            Status::new(
                status.code(),
                format!("descriptors[{i}]: {}", status.message()),
            )
        })?;
        Ok(Counted { policy, key, hits })
    }
}

/// The rate-limit key of a descriptor's entries (the `policy` entry aside), one key for one
/// list of entries and never the same for two: one entry is its value, with `\`, `|` and `=`
/// escaped by a `\` (so `remote_address` alone gives the client's address, the key an app's
/// `CheckRateLimit` uses too); several are `name=value` each, escaped alike, joined by `|`.
/// One entry's key holds no bare `=`, several entries' always do, so `[user="alice|10.0.0.7"]`
/// never counts against `[user="alice", remote_address="10.0.0.7"]`.
fn descriptor_key(entries: &[(&str, &str)]) -> String {
    fn escaped(text: &str, out: &mut String) {
        for c in text.chars() {
            if matches!(c, '\\' | '|' | '=') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    let mut key = String::new();
    if let [(_, value)] = entries {
        escaped(value, &mut key);
        return key;
    }
    for (i, (name, value)) in entries.iter().enumerate() {
        if i > 0 {
            key.push('|');
        }
        escaped(name, &mut key);
        key.push('=');
        escaped(value, &mut key);
    }
    key
}

/// The policy as Envoy's `x-ratelimit-limit` header shows it, when its period is one unit.
fn current_limit(p: &Policy) -> Option<RateLimit> {
    let unit = match p.period.as_secs() {
        _ if p.period.subsec_nanos() != 0 => return None,
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86400 => Unit::Day,
        _ => return None,
    };
    Some(RateLimit {
        name: p.name.clone(),
        requests_per_unit: p.count,
        unit: unit as i32,
    })
}

fn duration(d: std::time::Duration) -> protobuf::Duration {
    protobuf::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::descriptor_key;

    #[test]
    fn descriptor_keys_never_collide() {
        assert_eq!(
            descriptor_key(&[("remote_address", "10.0.0.7")]),
            "10.0.0.7"
        );
        let one = descriptor_key(&[("user", "alice|10.0.0.7")]);
        let two = descriptor_key(&[("user", "alice"), ("remote_address", "10.0.0.7")]);
        assert_eq!(one, "alice\\|10.0.0.7");
        assert_eq!(two, "user=alice|remote_address=10.0.0.7");
        assert_ne!(one, two);
        let forged = descriptor_key(&[("user", "alice|remote_address=10.0.0.7")]);
        assert_ne!(forged, two);
        let split = descriptor_key(&[("user", "alice"), ("remote_address", "x|y=z")]);
        let joined = descriptor_key(&[("user", "alice|remote_address=x"), ("y", "z")]);
        assert_ne!(split, joined);
    }
}
