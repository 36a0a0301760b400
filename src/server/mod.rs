//! The OpenAI-compatible HTTP server (`pagellm run MODEL --serve`), on axum/tokio.
//!
//! ```text
//! client --HTTP--> axum (tokio threads: parse, validate, render template, tokenize)
//!                    | Scheduler::submit(Request) -> Ticket          429 past --max-queue
//!                    v
//!              scheduler thread (owns the Engine) --Event::Token/Done/Error--> handler -> JSON or SSE
//! ```
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both also streamed as SSE, ending with
//! `data: [DONE]`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus
//! text). Every error is OpenAI's JSON shape (`error.rs`) with OpenAI's status; no request can panic the
//! server or touch another one: a client that goes away drops its [`Ticket`](crate::engine::scheduler::Ticket),
//! which frees its place in the queue or stops its generation at the next step.
//!
//! One line per request goes to stderr: `POST /v1/chat/completions 200 0.84s prompt=31 cached=0 ...`.

mod completions;
mod error;
mod metrics;
mod request;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::chat_template::{ChatTemplate, Message};
use crate::engine::scheduler::{Scheduler, SchedulerOptions};
use crate::engine::Engine;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

pub use error::ApiError;

type BoxError = Box<dyn std::error::Error>;

/// Most choices (`n`) per request.
pub const MAX_N: usize = 16;
/// Largest request body (a bigger one is answered 413).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// How `--serve` was asked to run.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0: any free port (the address actually bound is printed).
    pub port: u16,
    /// The id `/v1/models` reports and responses carry (`--alias`, else the file stem).
    pub model_id: String,
    /// When set, every endpoint wants `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    pub max_queue: usize,
    /// Most requests batched together (`--parallel`); 0: the scheduler's default.
    pub max_running: usize,
    /// Context (prompt + reply tokens) of a request: the one the engine was built with.
    pub ctx: usize,
    /// Sampling defaults (the run command's flags); a request's fields override them.
    pub defaults: SamplingParams,
}

/// Shared by every handler.
pub struct App {
    scheduler: Scheduler,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    opts: ServeOptions,
    /// Unix time the server started (the model's `created`).
    created: u64,
    started: Instant,
    /// HTTP responses by (endpoint, status).
    http: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

/// A note the request log line should carry (usage, an error message); set by handlers on responses.
#[derive(Clone, Debug)]
pub struct LogNote(pub String);

/// Marks a streamed response: its log line is written when the stream ends, not by the middleware.
#[derive(Clone, Copy, Debug)]
struct Streamed;

/// Serve `engine` (built with the context `opts.ctx`) until Ctrl-C or SIGTERM.
pub fn serve(engine: Engine, tokenizer: Tokenizer, template: ChatTemplate, opts: ServeOptions) -> Result<(), BoxError> {
    let tokenizer = Arc::new(tokenizer);
    let sched_opts = SchedulerOptions { ctx: opts.ctx, max_queue: opts.max_queue, max_n: MAX_N, max_running: opts.max_running };
    let scheduler =
        Scheduler::spawn(engine, tokenizer.clone(), sched_opts).map_err(|e| format!("cannot start the scheduler thread: {e}"))?;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let app = Arc::new(App { scheduler, tokenizer, template, opts, created, started: Instant::now(), http: Mutex::new(BTreeMap::new()) });

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("pagellm-http").enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", app.opts.host, app.opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e} (pick another --port or --host)"))?;
        let local: SocketAddr = listener.local_addr()?;
        eprintln!(
            "pagellm: serving {} on http://{local}/v1 (context {} tokens, queue {}{})",
            app.opts.model_id,
            app.opts.ctx,
            app.opts.max_queue,
            if app.opts.api_key.is_some() { ", API key required" } else { "" }
        );
        if !local.ip().is_loopback() {
            eprintln!("pagellm: note: listening on {}, reachable from other machines", local.ip());
        }
        // Not a graceful shutdown: a stream may run for minutes; its client sees the connection close.
        tokio::select! {
            r = axum::serve(listener, router(app.clone())) => r?,
            _ = shutdown_signal() => eprintln!("pagellm: shutting down"),
        }
        Ok::<(), BoxError>(())
    })?;
    // Ends the tasks still streaming; the last `App` handle then stops the scheduler (and its thread).
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(())
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model_by_id))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), auth_and_log))
        .with_state(app)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// The endpoint label for metrics and logs (bounded: unknown paths share one label).
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

/// Check the API key, run the handler, count the response and log it (streams log when they end).
async fn auth_and_log(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut pending = PendingLog { method: method.clone(), path: path.clone(), t: Instant::now(), done: false };
    let resp = match check_key(&app, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    };
    pending.done = true;
    let t = pending.t;
    let status = resp.status();
    *app.http.lock().unwrap_or_else(|e| e.into_inner()).entry((endpoint_label(&path), status.as_u16())).or_default() += 1;
    if resp.extensions().get::<Streamed>().is_none() {
        let note = resp.extensions().get::<LogNote>().map_or(String::new(), |n| format!(" {}", n.0));
        log_line(&method, &path, status, t, &note);
    }
    resp
}

/// Logs a request whose client left before its response was ready (the handler future was dropped).
struct PendingLog {
    method: Method,
    path: String,
    t: Instant,
    done: bool,
}

impl Drop for PendingLog {
    fn drop(&mut self) {
        if !self.done {
            // 499: nginx's "client closed request".
            eprintln!("{} {} 499 {:.2}s (client gone before the response)", self.method, self.path, self.t.elapsed().as_secs_f64());
        }
    }
}

pub(crate) fn log_line(method: &Method, path: &str, status: StatusCode, t: Instant, note: &str) {
    eprintln!("{method} {path} {} {:.2}s{note}", status.as_u16(), t.elapsed().as_secs_f64());
}

fn check_key(app: &App, req: &Request) -> Result<(), ApiError> {
    let Some(key) = &app.opts.api_key else { return Ok(()) };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(..7).filter(|b| b.eq_ignore_ascii_case("bearer ")).map(|_| &v[7..]));
    match given {
        Some(g) if g.trim() == key => Ok(()),
        Some(_) => Err(ApiError::unauthorized("Incorrect API key provided")),
        None => Err(ApiError::unauthorized("No API key provided: send 'Authorization: Bearer KEY' (the server's --api-key)")),
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let s = app.scheduler.stats();
    Json(json!({ "status": "ok", "model": app.opts.model_id, "waiting": s.waiting, "running": s.running })).into_response()
}

fn model_card(app: &App) -> serde_json::Value {
    json!({
        "id": app.opts.model_id,
        "object": "model",
        "created": app.created,
        "owned_by": "pagellm",
        "meta": { "n_ctx": app.opts.ctx, "n_vocab": app.tokenizer.n_vocab() },
    })
}

async fn models(State(app): State<Arc<App>>) -> Response {
    Json(json!({ "object": "list", "data": [model_card(&app)] })).into_response()
}

async fn model_by_id(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if id == app.opts.model_id {
        Json(model_card(&app)).into_response()
    } else {
        ApiError {
            code: Some("model_not_found"),
            ..ApiError::not_found(format!("the model '{id}' does not exist; this server serves '{}'", app.opts.model_id))
        }
        .into_response()
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let http = app.http.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let body = metrics::render(&app.scheduler.stats(), &app.scheduler.options(), &http, app.started.elapsed().as_secs_f64());
    let mut resp = body.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    ApiError::not_found(format!(
        "Invalid URL ({method} {}): this server has /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics",
        uri.path()
    ))
    .into_response()
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    ApiError { status: StatusCode::METHOD_NOT_ALLOWED, ..ApiError::invalid(None, format!("{method} is not allowed on {}", uri.path())) }
        .into_response()
}

impl App {
    /// The token ids of `messages` rendered by the chat template for the assistant's reply.
    fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, ApiError> {
        let text = self.template.render(messages, true).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
        // The template may already begin with the BOS text; then do not add a second one (as the REPL).
        let tok = &self.tokenizer;
        let bos_text = String::from_utf8_lossy(&tok.token_to_piece(tok.bos_id())).into_owned();
        let add_special = !(tok.add_bos() && !bos_text.is_empty() && text.starts_with(&bos_text));
        tok.encode(&text, add_special, true).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))
    }

    /// A completion prompt's token ids: text with BOS as the vocab wants it and special tokens parsed.
    fn text_prompt(&self, p: &request::Prompt) -> Result<Vec<u32>, ApiError> {
        match p {
            request::Prompt::Text(t) => self.tokenizer.encode(t, true, true).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string())),
            request::Prompt::Tokens(ids) => {
                let n_vocab = self.tokenizer.n_vocab();
                match ids.iter().find(|&&t| t as usize >= n_vocab) {
                    Some(t) => Err(ApiError::invalid(Some("prompt"), format!("token id {t} is outside the vocabulary of {n_vocab}"))),
                    None => Ok(ids.clone()),
                }
            }
        }
    }
}
