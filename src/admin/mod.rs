//! The admin web UI, on its own listener (`--admin-listen`, loopback by default; reach it with
//! `kubectl port-forward`): any node serves it from shared state. Log in with
//! `ADMIN_GUI_USERNAME` and `ADMIN_GUI_PASSWORD` (or `ADMIN_GUI_PASSWORD_HASH`), the same on
//! every node; without either, login answers 403. Login attempts are counted per user name and
//! per client address by the sidecar's own rate limiter on the shared store, with a lockout.
//!
//! Pages: the overview (health, backends, keys, policies, live nodes, a live chart), a
//! subject's sessions (delete one, log out everywhere), the token inspector (claims and the
//! exact Validate verdict; revoke), and rate limits (look up, reset).
//!
//! Web security: a CSRF token on every form that changes state (bound to the login; a
//! double-submit cookie for the login form itself), a strict Content-Security-Policy with no
//! script, `X-Frame-Options: DENY`, every value escaped by maud, no token, cookie or password
//! in a log line.

mod chart;
mod pages;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use maud::{Markup, html};
use serde::Deserialize;

use crate::cluster::Cluster;
use crate::config::{AdminCredential, Config};
use crate::health::Health;
use crate::ratelimit::{Policy, RateLimiter};
use crate::sessions::Sessions;
use crate::tokens::{Kind, RevokeTarget, Tokens, Verdict};
use pages::{Notice, page};

/// Longest subject, session id or rate-limit key the UI passes on, as the API's limit.
const MAX_TEXT: usize = 1024;

/// Whether the text is one the store can hold and the API would take.
fn usable(text: &str) -> bool {
    text.len() <= MAX_TEXT && !text.contains('\0')
}

/// Largest form accepted: a pasted token is at most 8 KiB.
const MAX_FORM: usize = 64 * 1024;

const STYLESHEET: &str = include_str!("admin.css");

/// What every page is served with: no script at all, nothing framed, nothing cached.
/// The overview's chart is inline SVG, which is no image fetch: `img-src` stays `'none'`.
const CSP: &str = "default-src 'none'; style-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Everything the admin UI reads and acts on.
#[derive(Clone)]
pub struct AdminUi(Arc<Inner>);

struct Inner {
    config: crate::config::Admin,
    /// The deployment's `--issuer`: a login of another deployment that shares the keys is
    /// refused.
    issuer: String,
    tokens: Arc<Tokens>,
    sessions: Arc<Sessions>,
    limits: Arc<RateLimiter>,
    policies: Vec<Policy>,
    /// Login attempts, under the admin policy only, so no app can read or reset them.
    logins: RateLimiter,
    health: Health,
    cluster: Option<Arc<Cluster>>,
    chart: chart::Chart,
}

impl AdminUi {
    pub fn new(
        config: &Config,
        tokens: Arc<Tokens>,
        sessions: Arc<Sessions>,
        limits: Arc<RateLimiter>,
        health: Health,
        cluster: Option<Arc<Cluster>>,
    ) -> AdminUi {
        let logins = RateLimiter::new(
            std::slice::from_ref(&config.admin.login_limit),
            tokens.store().clone(),
        );
        AdminUi(Arc::new(Inner {
            config: config.admin.clone(),
            issuer: config.issuer.clone(),
            tokens,
            sessions,
            limits,
            policies: config.rate_limits.clone(),
            logins,
            health,
            cluster,
            chart: chart::Chart::start(),
        }))
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(overview))
            .route("/admin.css", get(stylesheet))
            .route("/login", get(login_page).post(login))
            .route("/logout", post(logout))
            .route("/logout/everyone", post(logout_everyone))
            .route("/subject", get(subject_page))
            .route("/subject/delete", post(delete_session))
            .route("/subject/logout", post(logout_subject))
            .route("/token", get(token_page).post(inspect_token))
            .route("/token/revoke", post(revoke_token))
            .route("/limits", get(limits_page))
            .route("/limits/reset", post(reset_limit))
            .layer(DefaultBodyLimit::max(MAX_FORM))
            .layer(axum::middleware::from_fn(refuse_large_bodies))
            .layer(axum::middleware::map_response(secure_headers))
            .with_state(self)
    }

    /// What every login is bound to: this deployment, this user name, this credential.
    fn binding(&self) -> session::Binding<'_> {
        session::Binding {
            issuer: &self.0.issuer,
            user: &self.0.config.username,
            credential: match &self.0.config.credential {
                Some(crate::config::AdminCredential::Password(p)) => p.expose(),
                Some(crate::config::AdminCredential::Hash(h)) => h.as_bytes(),
                None => b"",
            },
        }
    }

    /// To the login page, the cookie deleted.
    fn logged_out(&self) -> Response {
        (
            StatusCode::SEE_OTHER,
            [
                (
                    header::SET_COOKIE,
                    self.set_cookie(self.cookie_name(), "", 0),
                ),
                (header::LOCATION, HeaderValue::from_static("/login")),
            ],
        )
            .into_response()
    }

    fn cookie_name(&self) -> &'static str {
        if self.0.config.secure_cookie {
            "__Host-authsidecar_admin"
        } else {
            "authsidecar_admin"
        }
    }

    /// A `Set-Cookie` value for `name`, living `max_age` seconds (0 deletes it).
    fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.0.config.secure_cookie {
            "; Secure"
        } else {
            ""
        };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        ))
        .expect("cookie values are base64url")
    }

    /// The login the request's cookie carries, checked on this node (signature, expiry) and
    /// in the shared store (not logged out on any node).
    async fn login_of(&self, headers: &HeaderMap) -> Result<Authenticated, Response> {
        let to_login = || Redirect::to("/login").into_response();
        let Some(value) = cookie(headers, self.cookie_name()) else {
            return Err(to_login());
        };
        let now = SystemTime::now();
        let keys = self.0.tokens.keys().current();
        let Some(login) = session::verify(&keys, &self.binding(), value, now) else {
            return Err(to_login());
        };
        match session::revoked(&**self.0.tokens.store(), &login, now).await {
            Ok(false) => {}
            Ok(true) => return Err(to_login()),
            Err(e) => return Err(unavailable(&e.to_string())),
        }
        let Some(csrf) = session::csrf(&keys, &login) else {
            return Err(to_login());
        };
        Ok(Authenticated { login, csrf })
    }

    /// The login, and the form's CSRF token checked against it: 403 when it does not match.
    async fn acting(&self, headers: &HeaderMap, csrf: &str) -> Result<Authenticated, Response> {
        let who = self.login_of(headers).await?;
        let keys = self.0.tokens.keys().current();
        if !session::csrf_matches(&keys, &who.login, csrf) {
            return Err(forbidden(
                "The form's CSRF token is missing or wrong: reload the page.",
            ));
        }
        Ok(who)
    }

    fn render(
        &self,
        who: &Authenticated,
        title: &str,
        notice: Option<Notice>,
        body: Markup,
    ) -> Markup {
        page(
            title,
            Some((&who.login.user, &who.csrf)),
            notice.as_ref(),
            body,
        )
    }
}

struct Authenticated {
    login: session::Login,
    csrf: String,
}

/// The value of cookie `name` in the request, if there is one.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Refuses at once, from its `Content-Length`, a body announced larger than any form here:
/// the body limit alone would first wait for the bytes, for as long as the peer dribbles them.
async fn refuse_large_bodies(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_FORM as u64) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("A form here is at most {MAX_FORM} bytes."),
        )
            .into_response();
    }
    next.run(request).await
}

fn forbidden(why: &str) -> Response {
    let body = page(
        "Forbidden",
        None,
        Some(&Notice::Problem(why.to_owned())),
        html! {},
    );
    (StatusCode::FORBIDDEN, body).into_response()
}

fn unavailable(why: &str) -> Response {
    tracing::warn!(error = why, "admin UI: the store did not answer");
    let body = page(
        "Unavailable",
        None,
        Some(&Notice::Problem(
            "The shared store does not answer; see /healthz on the ops port.".to_owned(),
        )),
        html! {},
    );
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
        .into_response()
}

const LOGIN_CSRF_COOKIE: &str = "authsidecar_login";

async fn login_page(State(ui): State<AdminUi>) -> Response {
    let mut nonce = [0u8; 16];
    aws_lc_rs::rand::fill(&mut nonce).expect("the system random source works");
    let nonce = URL_SAFE_NO_PAD.encode(nonce);
    let enabled = ui.0.config.credential.is_some();
    let body = page("Log in", None, None, pages::login(enabled, &nonce));
    let status = if enabled {
        StatusCode::OK
    } else {
        StatusCode::FORBIDDEN
    };
    (
        status,
        [(
            header::SET_COOKIE,
            ui.set_cookie(LOGIN_CSRF_COOKIE, &nonce, 600),
        )],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

async fn login(
    State(ui): State<AdminUi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(credential) = &ui.0.config.credential else {
        return forbidden(
            "The admin UI is off: set ADMIN_GUI_PASSWORD_HASH or ADMIN_GUI_PASSWORD on every node.",
        );
    };
    // The login form's own CSRF defence: the nonce in the form must be the one in the cookie
    // (which another site cannot read, nor send: SameSite=Strict).
    let nonce = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if nonce.is_empty()
        || aws_lc_rs::constant_time::verify_slices_are_equal(nonce.as_bytes(), form.csrf.as_bytes())
            .is_err()
    {
        return forbidden("The form's CSRF token is missing or wrong: reload the page.");
    }
    let policy = &ui.0.config.login_limit.name;
    let keys = [
        format!(
            "user:{}",
            form.username.chars().take(64).collect::<String>()
        ),
        format!("addr:{}", peer.ip()),
    ];
    // Every attempt counts, by user name and by address, on the shared store, before the
    // password is looked at: past the policy's allowance the lockout holds on every node,
    // whatever the password. A successful login clears both.
    for key in &keys {
        match ui.0.logins.check(policy, key, 1).await {
            Ok(d) if !d.allowed => return locked(d.retry_after),
            Ok(_) => {}
            Err(e) => return unavailable(&e.to_string()),
        }
    }
    let user_ok = aws_lc_rs::constant_time::verify_slices_are_equal(
        digest(form.username.as_bytes()).as_ref(),
        digest(ui.0.config.username.as_bytes()).as_ref(),
    )
    .is_ok();
    let password_ok = match credential {
        AdminCredential::Password(p) => aws_lc_rs::constant_time::verify_slices_are_equal(
            digest(form.password.as_bytes()).as_ref(),
            digest(p.expose()).as_ref(),
        )
        .is_ok(),
        AdminCredential::Hash(phc) => {
            let (phc, password) = (phc.clone(), form.password.clone());
            tokio::task::spawn_blocking(move || {
                use argon2::PasswordVerifier;
                argon2::PasswordHash::new(&phc).is_ok_and(|hash| {
                    argon2::Argon2::default()
                        .verify_password(password.as_bytes(), &hash)
                        .is_ok()
                })
            })
            .await
            .unwrap_or(false)
        }
    };
    if !(user_ok && password_ok) {
        tracing::warn!(user = %form.username, client = %peer.ip(), "admin UI: a login failed");
        let body = page(
            "Log in",
            None,
            Some(&Notice::Problem("Wrong user name or password.".to_owned())),
            pages::login(true, nonce),
        );
        return (StatusCode::UNAUTHORIZED, body).into_response();
    }
    for key in &keys {
        if let Err(e) = ui.0.logins.reset(policy, key).await {
            return unavailable(&e.to_string());
        }
    }
    let keys_now = ui.0.tokens.keys().current();
    let Some(value) = session::issue(
        &keys_now,
        &ui.binding(),
        ui.0.config.session_ttl,
        SystemTime::now(),
    ) else {
        return forbidden(
            "No key of the set can key the login cookie: the active key is in a PKCS#11 token or a KMS. \
             Add a private or HMAC file key to the keys directory (as verify).",
        );
    };
    tracing::info!(user = %ui.0.config.username, client = %peer.ip(), "admin UI: logged in");
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                ui.set_cookie(ui.cookie_name(), &value, ui.0.config.session_ttl.as_secs()),
            ),
            (header::LOCATION, HeaderValue::from_static("/")),
        ],
    )
        .into_response()
}

fn digest(bytes: &[u8]) -> aws_lc_rs::digest::Digest {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
}

fn locked(retry: std::time::Duration) -> Response {
    crate::telemetry::record_lockout("admin_login");
    let body = page(
        "Log in",
        None,
        Some(&Notice::Problem(format!(
            "Too many login attempts: locked out for {}.",
            humantime::format_duration(std::time::Duration::from_secs(retry.as_secs().max(1)))
        ))),
        html! {},
    );
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, retry.as_secs().max(1).to_string())],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(ui): State<AdminUi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Response> {
    let who = ui.acting(&headers, &form.csrf).await?;
    session::revoke(&**ui.0.tokens.store(), &who.login)
        .await
        .map_err(|e| unavailable(&e.to_string()))?;
    tracing::info!(user = %who.login.user, client = %peer.ip(), "admin UI: logged out");
    Ok(ui.logged_out())
}

/// Ends every admin login, this one included, on every node.
async fn logout_everyone(
    State(ui): State<AdminUi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Response> {
    let who = ui.acting(&headers, &form.csrf).await?;
    session::end_all(
        &**ui.0.tokens.store(),
        SystemTime::now(),
        ui.0.config.session_ttl,
    )
    .await
    .map_err(|e| unavailable(&e.to_string()))?;
    tracing::info!(user = %who.login.user, client = %peer.ip(), "admin UI: every admin session ended");
    Ok(ui.logged_out())
}

async fn overview(State(ui): State<AdminUi>, headers: HeaderMap) -> Result<Response, Response> {
    let who = ui.login_of(&headers).await?;
    let keys = ui.0.tokens.keys();
    let set = keys.current();
    let mut listed: Vec<_> = set.keys().collect();
    listed.sort_by_key(|k| k.kid().to_owned());
    let health = ui.0.health.clone();
    let body = html! {
        section.grid {
            div.card {
                h2 { "This node" }
                p id="health" class=(if health.serving() { "good" } else { "bad" }) {
                    (if health.serving() { "SERVING" } else { "NOT_SERVING" })
                }
                p { (health.backend_detail()) }
                p { "Storage: " (ui.0.tokens.store().backend()) ", version " (env!("CARGO_PKG_VERSION")) }
                @if let Some(cluster) = &ui.0.cluster {
                    @for line in cluster.health_detail().lines() { p { (line) } }
                }
            }
            div.card {
                h2 { "Signing keys" }
                table {
                    thead { tr { th { "kid" } th { "algorithm" } th { "state" } } }
                    tbody {
                        @for k in &listed {
                            tr { td { code { (k.kid()) } } td { (k.alg().to_string()) } td { (format!("{:?}", k.state()).to_lowercase()) } }
                        }
                    }
                }
                p { (keys.health_detail()) }
                @if let Some(at) = keys.loaded_at() {
                    p { "Loaded " (humantime::format_rfc3339_seconds(at).to_string()) }
                }
            }
            div.card {
                h2 { "Rate-limit policies" }
                @if ui.0.policies.is_empty() { p { "None configured." } }
                ul { @for p in &ui.0.policies { li { code { (p.to_string()) } } } }
            }
        }
        section.card {
            h2 { "Calls on this node" }
            (pages::chart(&ui.0.chart.samples()))
        }
        section.card {
            h2 { "Admin sessions" }
            p { "End every admin login on every node, this one included (a stolen cookie, a departed operator). Changing the admin password or user name does the same." }
            form method="post" action="/logout/everyone" {
                input type="hidden" name="csrf" value=(who.csrf);
                button type="submit" id="logout-everyone" { "End every admin session" }
            }
        }
    };
    Ok(ui.render(&who, "Overview", None, body).into_response())
}

#[derive(Deserialize, Default)]
struct SubjectQuery {
    #[serde(default)]
    s: String,
}

async fn subject_page(
    State(ui): State<AdminUi>,
    headers: HeaderMap,
    Query(q): Query<SubjectQuery>,
) -> Result<Response, Response> {
    let who = ui.login_of(&headers).await?;
    Ok(subject_view(&ui, &who, &q.s, None).await)
}

async fn subject_view(
    ui: &AdminUi,
    who: &Authenticated,
    subject: &str,
    notice: Option<Notice>,
) -> Response {
    let sessions = if subject.is_empty() {
        Ok(Vec::new())
    } else if !usable(subject) {
        Err(crate::tokens::Error::invalid(
            "subject",
            format!("must be at most {MAX_TEXT} bytes, without U+0000"),
        ))
    } else {
        ui.0.sessions.list(subject).await
    };
    let (sessions, notice) = match sessions {
        Ok(s) => (s, notice),
        Err(e) => (Vec::new(), Some(Notice::Problem(e.to_string()))),
    };
    let when = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let body = html! {
        form.card method="get" action="/subject" {
            label { "Subject" input type="text" name="s" id="subject" value=(subject) required; }
            button type="submit" id="lookup" { "Look up" }
        }
        @if !subject.is_empty() {
            section.card {
                h2 { "Sessions of " span id="subject-name" { (subject) } }
                @if sessions.is_empty() { p id="no-sessions" { "No live session." } }
                @else {
                    table id="sessions" {
                        thead { tr { th { "session" } th { "created" } th { "last seen" } th { "ends" } th {} } }
                        tbody {
                            @for s in &sessions {
                                tr {
                                    td { code { (s.id) } }
                                    td { (when(s.created_at)) }
                                    td { (when(s.last_seen_at)) }
                                    td { (when(s.live_until())) }
                                    td {
                                        form method="post" action="/subject/delete" {
                                            input type="hidden" name="csrf" value=(who.csrf);
                                            input type="hidden" name="subject" value=(subject);
                                            input type="hidden" name="session" value=(s.id);
                                            button.danger type="submit" { "Delete" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                form method="post" action="/subject/logout" {
                    input type="hidden" name="csrf" value=(who.csrf);
                    input type="hidden" name="subject" value=(subject);
                    button.danger type="submit" id="logout-everywhere" { "Log out everywhere" }
                    span.hint { " revokes every token of the subject issued until now, on every node, and deletes its sessions" }
                }
            }
        }
    };
    ui.render(who, "Subjects", notice, body).into_response()
}

#[derive(Deserialize)]
struct SessionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    session: String,
}

async fn delete_session(
    State(ui): State<AdminUi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<SessionForm>,
) -> Result<Response, Response> {
    let who = ui.acting(&headers, &f.csrf).await?;
    let deleted = if usable(&f.session) {
        ui.0.sessions.delete(&f.session).await
    } else {
        Ok(false)
    };
    let notice = match deleted {
        Ok(true) => {
            tracing::info!(user = %who.login.user, client = %peer.ip(), "admin UI: a session deleted");
            Notice::Done("Session deleted: its tokens are rejected on every node.".to_owned())
        }
        Ok(false) => Notice::Problem("No such live session.".to_owned()),
        Err(e) => Notice::Problem(e.to_string()),
    };
    Ok(subject_view(&ui, &who, &f.subject, Some(notice)).await)
}

async fn logout_subject(
    State(ui): State<AdminUi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<SessionForm>,
) -> Result<Response, Response> {
    let who = ui.acting(&headers, &f.csrf).await?;
    let notice = if f.subject.is_empty() || !usable(&f.subject) {
        Notice::Problem(format!(
            "Give a subject of at most {MAX_TEXT} bytes, without U+0000."
        ))
    } else {
        match ui
            .0
            .tokens
            .revoke(RevokeTarget::Subject(f.subject.clone()))
            .await
        {
            Ok(r) => {
                tracing::info!(user = %who.login.user, client = %peer.ip(), "admin UI: a subject logged out everywhere");
                Notice::Done(format!(
                    "Logged out everywhere: every token issued until now is rejected on every node; {} session(s) deleted.",
                    r.sessions_deleted
                ))
            }
            Err(e) => Notice::Problem(e.to_string()),
        }
    };
    Ok(subject_view(&ui, &who, &f.subject, Some(notice)).await)
}

async fn token_page(State(ui): State<AdminUi>, headers: HeaderMap) -> Result<Response, Response> {
    let who = ui.login_of(&headers).await?;
    Ok(token_view(&ui, &who, "", None).await)
}

#[derive(Deserialize)]
struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
}

async fn inspect_token(
    State(ui): State<AdminUi>,
    headers: HeaderMap,
    Form(f): Form<TokenForm>,
) -> Result<Response, Response> {
    let who = ui.acting(&headers, &f.csrf).await?;
    Ok(token_view(&ui, &who, f.token.trim(), None).await)
}

async fn revoke_token(
    State(ui): State<AdminUi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<TokenForm>,
) -> Result<Response, Response> {
    let who = ui.acting(&headers, &f.csrf).await?;
    let notice = match ui
        .0
        .tokens
        .revoke(RevokeTarget::Token(f.token.trim().to_owned()))
        .await
    {
        Ok(_) => {
            tracing::info!(user = %who.login.user, client = %peer.ip(), "admin UI: a token revoked");
            Notice::Done("Revoked on every node.".to_owned())
        }
        Err(e) => Notice::Problem(e.to_string()),
    };
    Ok(token_view(&ui, &who, f.token.trim(), Some(notice)).await)
}

/// The part of a token before its signature, decoded for reading: never trusted.
fn decoded_part(token: &str, index: usize) -> String {
    token
        .split('.')
        .nth(index)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| "(does not decode)".to_owned())
}

async fn token_view(
    ui: &AdminUi,
    who: &Authenticated,
    token: &str,
    notice: Option<Notice>,
) -> Response {
    let verdict = if token.is_empty() {
        None
    } else {
        Some(ui.0.tokens.validate(token, None, Kind::Access).await)
    };
    let body = html! {
        form.card method="post" action="/token" {
            input type="hidden" name="csrf" value=(who.csrf);
            label { "Token" textarea name="token" id="token" rows="4" spellcheck="false" { (token) } }
            button type="submit" id="inspect" { "Inspect" }
        }
        @if let Some(verdict) = &verdict {
            section.card {
                h2 { "Verdict" }
                @match verdict {
                    Ok(Verdict::Valid(v)) => p.good id="verdict" { "VALID" " · subject " (v.subject) },
                    Ok(Verdict::Invalid(reason)) => p.bad id="verdict" { (reason.label().to_uppercase()) },
                    Err(e) => p.bad id="verdict" { "UNAVAILABLE: " (e.to_string()) },
                }
                h3 { "Header (not verified)" }
                pre id="header" { (decoded_part(token, 0)) }
                h3 { "Claims (not verified)" }
                pre id="claims" { (decoded_part(token, 1)) }
                form method="post" action="/token/revoke" {
                    input type="hidden" name="csrf" value=(who.csrf);
                    input type="hidden" name="token" value=(token);
                    button.danger type="submit" id="revoke" { "Revoke this token" }
                }
            }
        }
    };
    ui.render(who, "Token inspector", notice, body)
        .into_response()
}

#[derive(Deserialize, Default)]
struct LimitQuery {
    #[serde(default)]
    policy: String,
    #[serde(default)]
    key: String,
}

async fn limits_page(
    State(ui): State<AdminUi>,
    headers: HeaderMap,
    Query(q): Query<LimitQuery>,
) -> Result<Response, Response> {
    let who = ui.login_of(&headers).await?;
    Ok(limits_view(&ui, &who, &q.policy, &q.key, None).await)
}

#[derive(Deserialize)]
struct LimitForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    key: String,
}

async fn reset_limit(
    State(ui): State<AdminUi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<LimitForm>,
) -> Result<Response, Response> {
    let who = ui.acting(&headers, &f.csrf).await?;
    let notice = match ui.0.limits.reset(&f.policy, &f.key).await {
        Ok(()) => {
            tracing::info!(user = %who.login.user, client = %peer.ip(), policy = %f.policy, "admin UI: a rate-limit key reset");
            Notice::Done("Reset on every node: full allowance, no lockout.".to_owned())
        }
        Err(e) => Notice::Problem(e.to_string()),
    };
    Ok(limits_view(&ui, &who, &f.policy, &f.key, Some(notice)).await)
}

async fn limits_view(
    ui: &AdminUi,
    who: &Authenticated,
    policy: &str,
    key: &str,
    notice: Option<Notice>,
) -> Response {
    let state = if policy.is_empty() || key.is_empty() {
        None
    } else {
        // Cost 0 peeks: nothing is counted.
        Some(ui.0.limits.check(policy, key, 0).await)
    };
    let secs = |d: std::time::Duration| {
        humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
    };
    let body = html! {
        form.card method="get" action="/limits" {
            label { "Policy"
                select name="policy" id="policy" {
                    @for p in &ui.0.policies {
                        option value=(p.name) selected[p.name == policy] { (p.to_string()) }
                    }
                }
            }
            label { "Key" input type="text" name="key" id="key" value=(key) required; }
            button type="submit" id="lookup" { "Look up" }
        }
        @if let Some(state) = &state {
            section.card {
                @match state {
                    Ok(d) => {
                        p id="limit-state" class=(if d.allowed { "good" } else { "bad" }) {
                            @if d.allowed { "allowed" } @else { "LOCKED OUT or over the limit" }
                        }
                        p { "Remaining " span id="remaining" { (d.remaining) } " of " (d.limit)
                            @if !d.allowed { "; retry in " (secs(d.retry_after)) }
                            "; full allowance in " (secs(d.reset_after)) }
                        form method="post" action="/limits/reset" {
                            input type="hidden" name="csrf" value=(who.csrf);
                            input type="hidden" name="policy" value=(policy);
                            input type="hidden" name="key" value=(key);
                            button.danger type="submit" id="reset" { "Reset" }
                        }
                    }
                    Err(e) => p.bad { (e.to_string()) },
                }
            }
        }
    };
    ui.render(who, "Rate limits", notice, body).into_response()
}
