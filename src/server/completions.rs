//! `POST /v1/chat/completions` and `POST /v1/completions`: parse, tokenize, submit to the scheduler, and
//! answer with one JSON object or a stream of SSE chunks in OpenAI's format.
//!
//! ```text
//! body --request.rs--> GenParams + prompt(s) --tokenize (blocking pool)--> Scheduler::submit per prompt
//!   non-stream: gather every choice's events --> chat.completion / text_completion
//!   stream:     a task turns events into `data: {chunk}` frames --> ... --> [usage chunk] --> data: [DONE]
//! ```
//! Choices: prompt `p` (completions may send several) with `n` choices gives indexes `p * n .. p * n + n`.
//! Usage: each prompt is counted once (its first choice's prefix-cache hit is `cached_tokens`), the
//! completion tokens of every choice add up.
//! A streaming client that goes away closes the frame channel; the task sees it at once (even during a
//! prefill), drops its tickets, and so cancels the request.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::error::ApiError;
use super::request::{parse_object, ChatRequest, CompletionRequest, GenParams};
use super::{log_line, App, LogNote, Streamed, MAX_BODY_BYTES};
use crate::engine::scheduler::{Event, Request, Ticket, Usage, MAX_TOP_LOGPROBS};
use crate::engine::FinishReason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Text => "/v1/completions",
        }
    }
    fn prompt_param(self) -> &'static str {
        match self {
            Kind::Chat => "messages",
            Kind::Text => "prompt",
        }
    }
}

/// What every response and chunk of one request repeats.
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    fn new(kind: Kind, model: &str) -> Meta {
        let prefix = if kind == Kind::Chat { "chatcmpl-" } else { "cmpl-" };
        let mut rng = rand::thread_rng();
        let id: String = (0..24).map(|_| rng.sample(rand::distributions::Alphanumeric) as char).collect();
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Meta { kind, id: format!("{prefix}{id}"), created, model: model.to_string() }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": concat!("pagellm-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        })
    }
}

pub async fn chat(State(app): State<Arc<App>>, body: Body) -> Response {
    let t = Instant::now();
    let prepared = async {
        let map = parse_object(&read_body(body).await?)?;
        let req = ChatRequest::parse(&map, &app.opts.defaults, super::MAX_N, MAX_TOP_LOGPROBS)?;
        let a = app.clone();
        // Rendering and tokenizing a long conversation takes a while: keep it off the async threads.
        let prompt = tokio::task::spawn_blocking(move || a.chat_prompt(&req.messages))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))??;
        Ok::<_, ApiError>((vec![prompt], req.params))
    };
    match prepared.await {
        Ok((prompts, params)) => respond(app, Kind::Chat, prompts, params, t).await,
        Err(e) => e.into_response(),
    }
}

pub async fn completions(State(app): State<Arc<App>>, body: Body) -> Response {
    let t = Instant::now();
    let prepared = async {
        let map = parse_object(&read_body(body).await?)?;
        let req = CompletionRequest::parse(&map, &app.opts.defaults, super::MAX_N, MAX_TOP_LOGPROBS)?;
        let a = app.clone();
        let prompts = tokio::task::spawn_blocking(move || req.prompts.iter().map(|p| a.text_prompt(p)).collect::<Result<Vec<_>, _>>())
            .await
            .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))??;
        Ok::<_, ApiError>((prompts, req.params))
    };
    match prepared.await {
        Ok((prompts, params)) => respond(app, Kind::Text, prompts, params, t).await,
        Err(e) => e.into_response(),
    }
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|e| ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        ..ApiError::invalid(None, format!("cannot read the request body (at most {} MiB): {e}", MAX_BODY_BYTES >> 20))
    })
}

/// Submit one request per prompt (all or none), then answer.
async fn respond(app: Arc<App>, kind: Kind, prompts: Vec<Vec<u32>>, params: GenParams, t: Instant) -> Response {
    let mut tickets = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let req = Request {
            prompt,
            n: params.n,
            max_tokens: params.max_tokens,
            sampling: params.sampling.clone(),
            stop: params.stop.clone(),
            logprobs: params.logprobs,
            json_object: params.json_object,
            kv_budget: params.kv_budget,
        };
        match app.scheduler.submit(req) {
            Ok(ticket) => tickets.push(ticket),
            // Dropping the tickets already taken cancels them.
            Err(e) => return ApiError::from_submit(&e, kind.prompt_param()).into_response(),
        }
    }
    let meta = Meta::new(kind, &app.opts.model_id);
    if params.stream {
        stream(app, meta, tickets, params, t)
    } else {
        match gather(&app, &meta, tickets, &params).await {
            Ok((body, note)) => {
                let mut resp = Json(body).into_response();
                resp.extensions_mut().insert(LogNote(note));
                resp
            }
            Err(e) => e.into_response(),
        }
    }
}

/// One token with its logprobs, for the `logprobs` fields.
struct TokenLp {
    id: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
    /// Where its text starts in the choice's text (completions' `text_offset`).
    offset: usize,
}

#[derive(Default)]
struct Choice {
    text: String,
    finish: Option<FinishReason>,
    tokens: Vec<TokenLp>,
}

/// Usage summed over prompts and choices (see the module doc).
#[derive(Default)]
struct UsageSum {
    prompt: usize,
    cached: usize,
    completion: usize,
    finish: Vec<&'static str>,
}

impl UsageSum {
    fn add(&mut self, index_in_prompt: usize, u: &Usage, finish: FinishReason) {
        if index_in_prompt == 0 {
            self.prompt += u.prompt_tokens;
            self.cached += u.cached_tokens;
        }
        self.completion += u.completion_tokens;
        self.finish.push(finish_str(finish));
    }

    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": { "cached_tokens": self.cached },
        })
    }

    fn note(&self) -> String {
        format!("prompt={} cached={} completion={} finish={}", self.prompt, self.cached, self.completion, self.finish.join(","))
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

/// Non-stream: every choice's events, then one response object.
async fn gather(app: &App, meta: &Meta, tickets: Vec<Ticket>, params: &GenParams) -> Result<(Value, String), ApiError> {
    let n = params.n;
    let mut choices: Vec<Choice> = (0..tickets.len() * n).map(|_| Choice::default()).collect();
    let mut usage = UsageSum::default();
    for (p, mut ticket) in tickets.into_iter().enumerate() {
        while let Some(ev) = ticket.recv().await {
            match ev {
                Event::Token { index, id, text, logprob, top_logprobs } => {
                    let c = &mut choices[p * n + index];
                    if let Some(logprob) = logprob {
                        c.tokens.push(TokenLp { id, logprob, top: top_logprobs, offset: c.text.len() });
                    }
                    c.text.push_str(&text);
                }
                Event::Done { index, text, finish_reason, usage: u } => {
                    let c = &mut choices[p * n + index];
                    c.text.push_str(&text);
                    c.finish = Some(finish_reason);
                    usage.add(index, &u, finish_reason);
                }
                Event::Error { message } => return Err(ApiError::internal(message)),
            }
        }
    }
    if choices.iter().any(|c| c.finish.is_none()) {
        return Err(ApiError::internal("the scheduler ended the request before every choice was done"));
    }
    let want_lp = params.logprobs.is_some();
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = c.finish.map(finish_str);
            match meta.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": { "role": "assistant", "content": c.text, "refusal": null },
                    "logprobs": if want_lp { chat_logprobs(app, &c.tokens) } else { Value::Null },
                    "finish_reason": finish,
                }),
                Kind::Text => json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": if want_lp { text_logprobs(app, &c.tokens) } else { Value::Null },
                    "finish_reason": finish,
                }),
            }
        })
        .collect();
    let mut body = meta.envelope(false, out);
    body["usage"] = usage.json();
    let mut note = usage.note();
    for n in &params.notes {
        note.push_str(&format!(" ({n})"));
    }
    Ok((body, note))
}

/// A token as OpenAI's chat logprobs show it: its text (lossy) and its bytes.
fn token_json(app: &App, id: u32, logprob: f32) -> Value {
    let bytes = app.tokenizer.token_to_piece(id);
    json!({ "token": String::from_utf8_lossy(&bytes), "logprob": logprob, "bytes": bytes })
}

/// `{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...], "refusal": null}`
fn chat_logprobs(app: &App, tokens: &[TokenLp]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut v = token_json(app, t.id, t.logprob);
            v["top_logprobs"] = t.top.iter().map(|&(id, lp)| token_json(app, id, lp)).collect();
            v
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// The legacy completions shape: parallel lists, `top_logprobs` as `{token: logprob}` maps.
fn text_logprobs(app: &App, tokens: &[TokenLp]) -> Value {
    let piece = |id: u32| String::from_utf8_lossy(&app.tokenizer.token_to_piece(id)).into_owned();
    json!({
        "tokens": tokens.iter().map(|t| piece(t.id)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|&(id, lp)| (piece(id), json!(lp))).collect()).collect::<Vec<Map<_, _>>>(),
        "text_offset": tokens.iter().map(|t| t.offset).collect::<Vec<_>>(),
    })
}

/// Stream: a task writes SSE frames into a channel that is the response body.
fn stream(app: Arc<App>, meta: Meta, tickets: Vec<Ticket>, params: GenParams, t: Instant) -> Response {
    let (tx, rx) = unbounded_channel::<Bytes>();
    tokio::spawn(produce(app, meta, tickets, params, tx, t));
    let frames = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    let mut resp = Response::new(Body::from_stream(frames));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp.extensions_mut().insert(Streamed);
    resp
}

fn frame(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Events of every ticket in order -> chunks; ends with the usage chunk (if asked) and `[DONE]`.
async fn produce(app: Arc<App>, meta: Meta, tickets: Vec<Ticket>, params: GenParams, tx: UnboundedSender<Bytes>, t: Instant) {
    let mut st = StreamState { app, meta, params, usage: UsageSum::default(), tokens_sent: 0 };
    let n = st.params.n;
    let mut outcome: Option<String> = None;
    'tickets: for (p, mut ticket) in tickets.into_iter().enumerate() {
        let mut ch = PromptChoices { started: vec![false; n], offsets: vec![0; n], done: 0 };
        loop {
            // Waiting on `closed` too: a client that leaves during a long prefill is seen at once.
            let ev = tokio::select! {
                _ = tx.closed() => None,
                ev = ticket.recv() => Some(ev),
            };
            let frames = match ev {
                None => Err(End::Gone),
                Some(None) if ch.done < n => Err(End::Failed("the scheduler ended the request before every choice was done".into())),
                Some(None) => break,
                Some(Some(Event::Error { message })) => Err(End::Failed(message)),
                Some(Some(ev)) => Ok(st.frames(p, &mut ch, ev)),
            };
            let end = match frames {
                Ok(frames) if frames.iter().all(|f| tx.send(f.clone()).is_ok()) => continue,
                Ok(_) | Err(End::Gone) => End::Gone,
                Err(failed) => failed,
            };
            outcome = Some(match end {
                End::Gone => format!("client gone after {} tokens", st.tokens_sent),
                End::Failed(message) => {
                    let _ = tx.send(frame(&ApiError::internal(message.as_str()).body()));
                    format!("error: {message}")
                }
            });
            break 'tickets;
        }
    }
    if outcome.is_none() {
        if st.params.include_usage {
            let mut v = st.meta.envelope(true, Vec::new());
            v["usage"] = st.usage.json();
            let _ = tx.send(frame(&v));
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    let mut note = format!(" stream {}", st.usage.note());
    for o in outcome.iter().map(String::as_str).chain(st.params.notes.iter().copied()) {
        note.push_str(&format!(" ({o})"));
    }
    log_line(&Method::POST, st.meta.kind.path(), StatusCode::OK, t, &note);
}

/// Why a stream ended early.
enum End {
    Gone,
    Failed(String),
}

/// What a stream carries across its events.
struct StreamState {
    app: Arc<App>,
    meta: Meta,
    params: GenParams,
    usage: UsageSum,
    tokens_sent: usize,
}

/// Per prompt: which choices have begun (chat sends the role first), text offsets, choices done.
struct PromptChoices {
    started: Vec<bool>,
    offsets: Vec<usize>,
    done: usize,
}

impl StreamState {
    fn chunk(&self, choice: Value) -> Bytes {
        let mut v = self.meta.envelope(true, vec![choice]);
        if self.params.include_usage {
            v["usage"] = Value::Null;
        }
        frame(&v)
    }

    /// The chunks for one token or done event of prompt `p`.
    fn frames(&mut self, p: usize, ch: &mut PromptChoices, ev: Event) -> Vec<Bytes> {
        let mut frames = Vec::new();
        let (Event::Token { index, .. } | Event::Done { index, .. }) = ev else { return frames };
        let global = p * self.params.n + index;
        if self.meta.kind == Kind::Chat && !ch.started[index] {
            frames.push(self.chunk(
                json!({ "index": global, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }),
            ));
        }
        ch.started[index] = true;
        match ev {
            Event::Token { id, text, logprob, top_logprobs, .. } => {
                self.tokens_sent += 1;
                let lp = logprob.map(|logprob| TokenLp { id, logprob, top: top_logprobs, offset: ch.offsets[index] });
                ch.offsets[index] += text.len();
                if !text.is_empty() || lp.is_some() {
                    frames.push(self.chunk(delta(&self.app, self.meta.kind, global, &text, lp.as_ref())));
                }
            }
            Event::Done { text, finish_reason, usage, .. } => {
                ch.done += 1;
                self.usage.add(index, &usage, finish_reason);
                let finish = finish_str(finish_reason);
                frames.push(self.chunk(match self.meta.kind {
                    Kind::Chat if text.is_empty() => json!({ "index": global, "delta": {}, "logprobs": null, "finish_reason": finish }),
                    Kind::Chat => json!({ "index": global, "delta": { "content": text }, "logprobs": null, "finish_reason": finish }),
                    Kind::Text => json!({ "index": global, "text": text, "logprobs": null, "finish_reason": finish }),
                }));
            }
            Event::Error { .. } => {} // ends the stream in `produce`
        }
        frames
    }
}

/// One token's chunk body.
fn delta(app: &App, kind: Kind, index: usize, text: &str, lp: Option<&TokenLp>) -> Value {
    match kind {
        Kind::Chat => json!({
            "index": index,
            "delta": { "content": text },
            "logprobs": lp.map_or(Value::Null, |lp| chat_logprobs(app, std::slice::from_ref(lp))),
            "finish_reason": null,
        }),
        Kind::Text => json!({
            "index": index,
            "text": text,
            "logprobs": lp.map_or(Value::Null, |lp| text_logprobs(app, std::slice::from_ref(lp))),
            "finish_reason": null,
        }),
    }
}
