//! The admin HTTP endpoint (actix-web), on a port of its own (`http_listen`).
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the status page (`status.html`, embedded; no external resources): both nodes, the gateway, the destinations, charts of the last minutes, the pair's events |
//! | `GET /status` | the node's status as JSON (`node::GetNodeStatus`, the report `twinmq status` shows; `events`: the pair's recent events) |
//! | `GET /series` | the last five minutes, one sample a second, as JSON (`series.rs`: rates, confirm p99, replication lag, the deepest destinations) |
//! | `GET /metrics` | Prometheus text exposition (`metrics.rs`) |
//! | `POST /switchover` | hand the active role to the in-sync peer (`node::Admin`, as `twinmq switchover`) |
//!
//! **HTTPS** with `http_tls = true`: the client port's certificate
//! (`tls_cert`, `tls_key`); the token still authenticates the caller.
//!
//! **Credential.** `http_token` (or env `TWINMQ_HTTP_TOKEN`). Accepted as
//! `Authorization: Bearer <token>` (scripts, Prometheus) or HTTP Basic with
//! the token as password and any user name (browsers: the 401 carries a
//! `WWW-Authenticate: Basic` challenge so they ask). Compared in constant
//! time. With a token configured every route needs it; without one the GET
//! routes are open (bind them to a trusted address) and `POST /switchover`
//! is refused with 403: changing roles always needs the credential.
//!
//! **Browsers** (issue 10, finding 9). `POST /switchover` takes the token
//! as `Authorization: Bearer` only: a browser adds a cached Basic credential
//! to any request, a cross-site form's included (CSRF), while a Bearer
//! header is set by a script, which a browser lets another site do only
//! after a CORS preflight this endpoint never grants. A POST whose `Origin`
//! is not this endpoint, or with `Sec-Fetch-Site: cross-site`, is refused.
//! Without a token, the open reads check `Host`: an IP address,
//! `localhost`, or a name in `http_hosts`; otherwise a page at a rebinding
//! domain could read `/status` (421). With a token there is nothing to
//! rebind for: a page of another origin never holds the credential.
//!
//! Every node answers, passive ones included: it is the operator's view of
//! the pair. The server runs on the broker's actix System with one worker
//! thread of its own, so a busy client port does not slow the status page.
//! Starting the endpoint starts the `Sampler` (`series.rs`) on the calling
//! arbiter: a node without `http_listen` samples nothing.

use std::net::SocketAddr;
use std::time::Duration;

use actix::Addr;
use actix_web::dev::ServerHandle;
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use subtle::ConstantTimeEq;
use twinmq_protocol::{AdminCommand, ErrorCode};

use crate::metrics::Metrics;
use crate::node::{self, Node};
use crate::series::{GetSeries, Sampler};
use crate::status::NodeStatus;
use crate::BrokerError;

/// The status page: one static file, fetched once, polling `/status`.
const STATUS_PAGE: &str = include_str!("status.html");

/// How long a stopping HTTP server waits for requests in progress.
const SHUTDOWN_GRACE_SECS: u64 = 2;

/// What the handlers need.
#[derive(Clone)]
struct HttpState {
    node: Addr<Node>,
    metrics: Metrics,
    /// The last minutes, for `GET /series`.
    sampler: Addr<Sampler>,
    /// `None`: GET routes are open and switchover is refused.
    token: Option<String>,
    /// Names `Host` may carry besides IP addresses and `localhost`.
    hosts: Vec<String>,
}

/// The running endpoint; `stop` it during shutdown.
pub struct HttpEndpoint {
    pub addr: SocketAddr,
    handle: ServerHandle,
}

impl HttpEndpoint {
    /// Stop accepting at once; the future resolves when requests in progress
    /// are done (at most `SHUTDOWN_GRACE_SECS`: idle keep-alive connections
    /// of an open status page count too, so await it late).
    pub fn stop(&self) -> impl std::future::Future<Output = ()> {
        self.handle.stop(true)
    }
}

/// Serve on `listener` (bound, non-blocking). Must run inside an actix System.
pub fn start(
    listener: std::net::TcpListener,
    node: Addr<Node>,
    metrics: Metrics,
    token: Option<String>,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    hosts: Vec<String>,
) -> Result<HttpEndpoint, BrokerError> {
    let local = crate::sockets::local_addr(&listener);
    let sampler = actix::Actor::start(Sampler::new(node.clone(), metrics.clone()));
    let state = HttpState { node, metrics, sampler, token, hosts };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .service(web::resource("/").route(web::get().to(page)).default_service(web::to(not_allowed)))
            .service(web::resource("/status").route(web::get().to(status_json)).default_service(web::to(not_allowed)))
            .service(web::resource("/series").route(web::get().to(series_json)).default_service(web::to(not_allowed)))
            .service(web::resource("/metrics").route(web::get().to(metrics_text)).default_service(web::to(not_allowed)))
            .service(
                web::resource("/switchover").route(web::post().to(switchover)).default_service(web::to(not_allowed)),
            )
            .default_service(web::to(not_found))
    })
    .workers(1)
    // The daemon owns the signals; shutdown comes through `stop`.
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE_SECS)
    .client_request_timeout(Duration::from_secs(5));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = match tls {
        // actix sets its own ALPN protocols on the copy it is given.
        Some(config) => server.listen_rustls_0_23(listener, (*config).clone()),
        None => server.listen(listener),
    }
    .map_err(|source| BrokerError::Bind { addr: local, source })?
    .run();
    let handle = server.handle();
    actix_rt::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "admin HTTP server failed");
        }
    });
    tracing::info!(http_listen = %local, scheme, "admin HTTP endpoint listening");
    Ok(HttpEndpoint { addr: local, handle })
}

fn json_error(code: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(code).json(serde_json::json!({ "error": message.into() }))
}

/// The token the request presents, if any: Bearer, or the password of Basic.
fn presented_token(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = <base64ct::Base64 as base64ct::Encoding>::decode_vec(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_user, password) = text.split_once(':')?;
        return Some(password.to_string());
    }
    None
}

/// `None` when the request may proceed, else the 401 to send.
fn refusal(req: &HttpRequest, token: &str) -> Option<HttpResponse> {
    let ok = presented_token(req).is_some_and(|t| bool::from(t.as_bytes().ct_eq(token.as_bytes())));
    if ok {
        return None;
    }
    let why = if req.headers().contains_key(header::AUTHORIZATION) {
        "wrong credential"
    } else {
        "credential required: send `Authorization: Bearer <http_token>` or HTTP Basic with the token as password"
    };
    tracing::info!(peer = ?req.peer_addr(), path = req.path(), "admin HTTP request refused: {why}");
    let mut resp = json_error(StatusCode::UNAUTHORIZED, why);
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"twinmq\""));
    Some(resp)
}

/// GET routes: open without a token, else the token is required.
fn read_refusal(req: &HttpRequest, state: &HttpState) -> Option<HttpResponse> {
    match state.token.as_deref() {
        Some(token) => refusal(req, token),
        // Open reads: only to a Host that names this endpoint.
        None => host_refusal(req, state),
    }
}

/// The host part of a `Host` header value (`name`, `name:port`, `[v6]:port`).
fn host_name(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match value.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => value,
    }
}

/// `Host` must name this endpoint: an IP address, `localhost`, or one of
/// `http_hosts`. A name that rebinds to our address is refused with 421.
fn host_refusal(req: &HttpRequest, state: &HttpState) -> Option<HttpResponse> {
    let value = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let host = host_name(value.trim()).trim_end_matches('.').to_ascii_lowercase();
    let ok = host.parse::<std::net::IpAddr>().is_ok()
        || host == "localhost"
        || state.hosts.contains(&host)
        // HTTP/1.0 without Host: nothing for a browser to rebind.
        || value.is_empty();
    if ok {
        return None;
    }
    tracing::info!(peer = ?req.peer_addr(), host = ?value, "admin HTTP request refused: Host not listed in http_hosts");
    Some(json_error(
        StatusCode::MISDIRECTED_REQUEST,
        format!("this endpoint does not answer to host {value:?}: add it to http_hosts, or use the IP address"),
    ))
}

/// A state-changing request from a browser page of another site, by its
/// `Origin` or `Sec-Fetch-Site`.
fn cross_site(req: &HttpRequest) -> bool {
    let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
    if h("sec-fetch-site").is_some_and(|v| v == "cross-site" || v == "same-site") {
        return true;
    }
    match (h("origin"), h("host")) {
        (None, _) => false,
        (Some(origin), host) => {
            let origin_host = origin.split("://").nth(1).unwrap_or("");
            origin == "null" || host.is_none_or(|host| origin_host != host)
        }
    }
}

async fn page(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(resp) = read_refusal(&req, &state) {
        return resp;
    }
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(STATUS_PAGE)
}

async fn node_status(state: &HttpState) -> Result<NodeStatus, HttpResponse> {
    state
        .node
        .send(node::GetNodeStatus)
        .await
        .map_err(|_| json_error(StatusCode::SERVICE_UNAVAILABLE, "the broker is shutting down"))
}

async fn status_json(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(resp) = read_refusal(&req, &state) {
        return resp;
    }
    match node_status(&state).await {
        Ok(s) => HttpResponse::Ok().insert_header((header::CACHE_CONTROL, "no-store")).json(s),
        Err(resp) => resp,
    }
}

async fn series_json(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(resp) = read_refusal(&req, &state) {
        return resp;
    }
    match state.sampler.send(GetSeries).await {
        Ok(report) => HttpResponse::Ok().insert_header((header::CACHE_CONTROL, "no-store")).json(report),
        Err(_) => json_error(StatusCode::SERVICE_UNAVAILABLE, "the broker is shutting down"),
    }
}

async fn metrics_text(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(resp) = read_refusal(&req, &state) {
        return resp;
    }
    let status = match node_status(&state).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    match state.metrics.encode(&status) {
        Ok(text) => {
            HttpResponse::Ok().content_type("application/openmetrics-text; version=1.0.0; charset=utf-8").body(text)
        }
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}")),
    }
}

async fn switchover(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    let Some(token) = &state.token else {
        return json_error(
            StatusCode::FORBIDDEN,
            "switchover over HTTP is disabled: no http_token is configured on this node",
        );
    };
    if cross_site(&req) {
        tracing::warn!(peer = ?req.peer_addr(), "admin HTTP switchover refused: a request from another site");
        return json_error(StatusCode::FORBIDDEN, "switchover refused: the request comes from another site's page");
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().get(..7).is_some_and(|s| s.eq_ignore_ascii_case("bearer ")));
    if !bearer {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "switchover needs `Authorization: Bearer <http_token>` (Basic is for reading only: browsers send it to any site's form)",
        );
    }
    if let Some(resp) = refusal(&req, token) {
        return resp;
    }
    tracing::info!(peer = ?req.peer_addr(), "operator command over HTTP: switchover");
    let command = node::Admin { command: AdminCommand::Switchover, caller: node::Caller::HttpToken, force: false };
    let answer = state.node.send(command).await;
    if let (Ok(result), Some(from)) = (&answer, req.peer_addr()) {
        let result = result.as_ref().map(|_| ()).map_err(|(_, m)| m.as_str());
        crate::audit::command("http-token", from, &AdminCommand::Switchover, false, result);
    }
    match answer {
        Ok(Ok(_)) => HttpResponse::Ok().json(serde_json::json!({
            "result": "switched over: this node is passive now and its peer takes the active role",
        })),
        // Not possible in the current state: passive node, no pair, no in-sync peer.
        Ok(Err((ErrorCode::NotActive | ErrorCode::InvalidRequest, message))) => {
            json_error(StatusCode::CONFLICT, format!("switchover refused: {message}"))
        }
        Ok(Err((_, message))) => json_error(StatusCode::SERVICE_UNAVAILABLE, format!("switchover failed: {message}")),
        Err(_) => json_error(StatusCode::SERVICE_UNAVAILABLE, "the broker is shutting down"),
    }
}

async fn not_allowed(req: HttpRequest) -> HttpResponse {
    json_error(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {}", req.method(), req.path()))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    json_error(
        StatusCode::NOT_FOUND,
        format!("no route {}; try /, /status, /series, /metrics, POST /switchover", req.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn token_of(auth: &str) -> Option<String> {
        presented_token(&TestRequest::default().insert_header((header::AUTHORIZATION, auth)).to_http_request())
    }

    #[test]
    fn bearer_and_basic_credentials_are_read() {
        assert_eq!(token_of("Bearer abc123").as_deref(), Some("abc123"));
        assert_eq!(token_of("bearer  abc123 ").as_deref(), Some("abc123"));
        // "admin:s3cret" and ":s3cret" (the user name is ignored).
        assert_eq!(token_of("Basic YWRtaW46czNjcmV0").as_deref(), Some("s3cret"));
        assert_eq!(token_of("Basic OnMzY3JldA==").as_deref(), Some("s3cret"));
        assert_eq!(token_of("Basic !!!notbase64"), None);
        assert_eq!(token_of("Digest abc"), None);
        assert_eq!(token_of("Bearer"), None);
    }

    #[test]
    fn host_names_are_parsed() {
        assert_eq!(host_name("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("evil.example"), "evil.example");
        assert_eq!(host_name("evil.example:80"), "evil.example");
    }

    /// Issue 10, finding 9: a form on evil.example posted to /switchover with
    /// the browser's cached Basic credential and swapped the roles.
    #[test]
    fn requests_from_another_sites_page_are_told_apart() {
        let req = |headers: &[(&str, &str)]| {
            let mut r = TestRequest::post().uri("/switchover");
            for (k, v) in headers {
                r = r.insert_header((*k, *v));
            }
            r.to_http_request()
        };
        assert!(cross_site(&req(&[("origin", "http://evil.example"), ("host", "10.0.0.1:8080")])));
        assert!(cross_site(&req(&[("origin", "null"), ("host", "10.0.0.1:8080")])));
        assert!(cross_site(&req(&[("sec-fetch-site", "cross-site")])));
        assert!(!cross_site(&req(&[("origin", "http://10.0.0.1:8080"), ("host", "10.0.0.1:8080")])));
        assert!(!cross_site(&req(&[("host", "10.0.0.1:8080")])), "curl sends no Origin");
    }

    #[test]
    fn a_wrong_token_gets_401_with_a_challenge() {
        let req = TestRequest::default().insert_header((header::AUTHORIZATION, "Bearer nope")).to_http_request();
        let resp = refusal(&req, "right-token").unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().get(header::WWW_AUTHENTICATE).is_some());
        let req = TestRequest::default().insert_header((header::AUTHORIZATION, "Bearer right-token")).to_http_request();
        assert!(refusal(&req, "right-token").is_none());
        assert!(refusal(&TestRequest::default().to_http_request(), "right-token").is_some());
    }
}
