//! The OpenAI-compatible server through the binary (`pagellm run MODEL --serve --port 0`) on the real
//! SmolLM2 model, over plain HTTP/1.1 on loopback: every error case with its status and body, /health,
//! /v1/models, /metrics, stream vs non-stream at temperature 0, stop strings, a client that disconnects
//! mid-stream (and one waiting in the queue), the 429 past --max-queue, a 5-turn conversation whose later
//! turns hit the prefix cache, `tests/server_openai.py` with the official `openai` package, 16
//! concurrent streaming clients batched together (each reply equal to its solo run), and faults under
//! preemption on a small pool that leave no KV block leaked; `response_format: json_object` replies that
//! are exactly one JSON object.
//!
//! Every loop here is bounded in count and time; every server is killed when its test ends.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const KEY: &str = "sk-pagellm-test";

/// A server process; killed on drop. Its stderr is echoed (prefixed) and kept for assertions.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pagellm"))
            .arg("run")
            .arg(model)
            .args(["--serve", "--host", "127.0.0.1", "--port", "0", "-t", "1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting pagellm");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  [server] {line}");
                if let Some(rest) = line.split("on http://").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or("").to_string());
                }
                l.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not say where it listens within 60 s; its log: {:?}", log.lock().unwrap());
            }
        };
        assert!(addr.starts_with("127.0.0.1:"), "not loopback: {addr}");
        Server { child, addr, log }
    }

    fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body, in order.
    fn events(&self) -> Vec<String> {
        self.body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

/// Writes one HTTP/1.1 request (Connection: close) to a fresh connection.
fn send(addr: &str, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

fn request(addr: &str, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> Resp {
    let mut s = send(addr, method, path, key, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (headers, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {raw:?}"));
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = headers.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Resp { status, headers: headers.to_string(), body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn post(addr: &str, path: &str, key: Option<&str>, body: &Value) -> Resp {
    request(addr, "POST", path, key, body.to_string().as_bytes())
}

fn get(addr: &str, path: &str, key: Option<&str>) -> Resp {
    request(addr, "GET", path, key, b"")
}

/// Asserts an OpenAI-shaped error with this status (and param, when given); returns its message.
fn expect_error(r: &Resp, status: u16, param: Option<&str>) -> String {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    let e = &v["error"];
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error body lacks '{k}': {v}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], json!(p), "{v}");
    }
    e["message"].as_str().unwrap().to_string()
}

/// A gauge or counter from /metrics.
fn metric(addr: &str, key: Option<&str>, name: &str) -> f64 {
    let r = get(addr, "/metrics", key);
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{}", r.body))
        .parse()
        .unwrap()
}

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

/// Reads an SSE response until its first content chunk; returns the open connection.
fn open_stream_until_first_token(addr: &str, key: Option<&str>, path: &str, body: &Value) -> TcpStream {
    let s = send(addr, "POST", path, key, body.to_string().as_bytes());
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let t = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended before a token");
        if line.contains("\"text\":\"") && !line.contains("\"text\":\"\"")
            || line.contains("\"content\":\"") && !line.contains("\"content\":\"\"")
        {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no token within 60 s");
    }
}

#[test]
fn errors_auth_queue_and_disconnects() {
    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    let srv = Server::start(&model, &["-c", "512", "--api-key", KEY, "--max-queue", "1", "--parallel", "1", "--alias", "smol"]);
    let (a, k) = (srv.addr.as_str(), Some(KEY));
    let chat = |body: Value| post(a, "/v1/chat/completions", k, &body);

    // Authentication: every endpoint, missing or wrong key.
    for path in ["/health", "/v1/models", "/metrics"] {
        let e = get(a, path, None);
        expect_error(&e, 401, None);
        assert_eq!(e.json()["error"]["code"], "invalid_api_key");
    }
    expect_error(&post(a, "/v1/chat/completions", Some("sk-wrong"), &json!({"messages": user("hi")})), 401, None);

    // /health and /v1/models.
    let h = get(a, "/health", k);
    assert_eq!((h.status, h.json()["status"].clone()), (200, json!("ok")));
    let m = get(a, "/v1/models", k).json();
    assert_eq!(
        (m["object"].clone(), m["data"][0]["id"].clone(), m["data"][0]["object"].clone()),
        (json!("list"), json!("smol"), json!("model"))
    );
    assert_eq!(get(a, "/v1/models/smol", k).status, 200);
    expect_error(&get(a, "/v1/models/other", k), 404, None);

    // Malformed JSON, wrong types (the message names the field), bad values.
    let r = request(a, "POST", "/v1/chat/completions", k, b"{\"messages\": [");
    assert!(expect_error(&r, 400, None).contains("not valid JSON"));
    expect_error(&request(a, "POST", "/v1/completions", k, b"[1, 2]"), 400, None);
    let msg = expect_error(&chat(json!({"messages": user("hi"), "temperature": "hot"})), 400, Some("temperature"));
    assert!(msg.contains("'temperature' must be a number"), "{msg}");
    expect_error(&chat(json!({"messages": "hi"})), 400, Some("messages"));
    expect_error(&chat(json!({"messages": [{"role": "user", "content": 7}]})), 400, Some("messages[0].content"));
    expect_error(&chat(json!({"messages": user("hi"), "max_tokens": "5"})), 400, Some("max_tokens"));
    expect_error(&chat(json!({"messages": user("hi"), "stream": "yes"})), 400, Some("stream"));
    expect_error(&chat(json!({"messages": user("hi"), "stop": [1, 2]})), 400, Some("stop"));
    expect_error(&chat(json!({"messages": user("hi"), "n": 0})), 400, Some("n"));
    expect_error(&chat(json!({"messages": user("hi"), "temperature": 3})), 400, Some("temperature"));
    expect_error(&chat(json!({})), 400, Some("messages"));
    expect_error(&post(a, "/v1/completions", k, &json!({"prompt": {"a": 1}})), 400, Some("prompt"));

    // A prompt longer than the context, and max_tokens past it: 400 that states the limit.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(80);
    let msg = expect_error(&chat(json!({"messages": user(&long)})), 400, Some("messages"));
    assert!(msg.contains("context of 512 tokens"), "{msg}");
    assert_eq!(chat(json!({"messages": user(&long)})).json()["error"]["code"], "context_length_exceeded");
    let msg = expect_error(&chat(json!({"messages": user("hi"), "max_tokens": 100000})), 400, Some("max_tokens"));
    assert!(msg.contains("512"), "{msg}");
    // A 1 MB prompt is refused the same way, quickly.
    let t = Instant::now();
    expect_error(&post(a, "/v1/completions", k, &json!({"prompt": "x ".repeat(500_000)})), 400, Some("prompt"));
    assert!(t.elapsed() < Duration::from_secs(30));

    // Unknown endpoint and wrong method.
    expect_error(&get(a, "/v1/nothing", k), 404, None);
    expect_error(&post(a, "/v2/chat/completions", k, &json!({})), 404, None);
    expect_error(&get(a, "/v1/chat/completions", k), 405, None);

    // The queue: A runs (streaming), B waits (--max-queue 1), C is refused with 429.
    let count = json!({"prompt": "Count from 1 to 500: 1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0, "stream": true});
    let a_stream = open_stream_until_first_token(a, k, "/v1/completions", &count);
    let addr = a.to_string();
    let b = std::thread::spawn(move || {
        let r = post(&addr, "/v1/chat/completions", Some(KEY), &json!({"messages": user("Say hi."), "max_tokens": 4, "temperature": 0}));
        (r, Instant::now())
    });
    let t = Instant::now();
    while metric(a, k, "pagellm_queue_length") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(20), "B never showed up in the queue");
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = chat(json!({"messages": user("hi"), "max_tokens": 2}));
    expect_error(&c, 429, None);
    assert_eq!(c.json()["error"]["code"], "queue_full");

    // A's client goes away mid-stream: its generation stops at once, and B runs.
    let dropped = Instant::now();
    drop(a_stream);
    let (rb, b_done) = b.join().unwrap();
    assert_eq!(rb.status, 200, "{}", rb.body);
    let waited = b_done.duration_since(dropped);
    assert!(waited < Duration::from_secs(10), "B waited {waited:?} after A's client left: A's generation was not stopped");
    assert!(metric(a, k, "pagellm_requests_total{outcome=\"cancelled\"}") >= 1.0);
    assert!(metric(a, k, "pagellm_requests_total{outcome=\"rejected_queue_full\"}") >= 1.0);
    assert_eq!(metric(a, k, "pagellm_queue_length"), 0.0);
    let t = Instant::now();
    while metric(a, k, "pagellm_requests_running") > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the scheduler still runs a finished request");
        std::thread::sleep(Duration::from_millis(10));
    }

    // A non-stream client that leaves while its request runs does not hurt the next one either.
    let s = send(
        a,
        "POST",
        "/v1/completions",
        k,
        json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 300, "temperature": 0}).to_string().as_bytes(),
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let t = Instant::now();
    while metric(a, k, "pagellm_requests_total{outcome=\"cancelled\"}") < 2.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the request of the client that left was not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ok = chat(json!({"messages": user("What is the capital of France?"), "max_tokens": 8, "temperature": 0}));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(!ok.json()["choices"][0]["message"]["content"].as_str().unwrap().is_empty());

    // Garbage on the socket does not take the server down.
    let mut g = TcpStream::connect(a).unwrap();
    let _ = g.write_all(b"\x00\x01garbage\r\n\r\n");
    drop(g);
    assert_eq!(get(a, "/health", k).status, 200);
    assert!(srv.log_has("POST /v1/chat/completions 429"), "no log line for the 429");
    assert!(srv.log_has("client gone after"), "no log line for the streaming client that left");
    assert!(srv.log_has("POST /v1/completions 499"), "no log line for the waiting client that left");
}

#[test]
fn stream_matches_non_stream_and_turns_hit_the_cache() {
    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    let srv = Server::start(&model, &["-c", "2048"]);
    let a = srv.addr.as_str();
    let q = json!({"model": "anything", "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name three colors."}], "temperature": 0, "max_tokens": 40});

    // Non-stream and stream at temperature 0 give the same text and finish reason.
    let r = post(a, "/v1/chat/completions", None, &q);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let finish = v["choices"][0]["finish_reason"].clone();
    assert!(!text.is_empty());
    assert!(finish == "stop" || finish == "length", "{finish}");
    let u = &v["usage"];
    assert_eq!(u["total_tokens"], json!(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()));
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());
    if finish == "length" {
        assert_eq!(u["completion_tokens"], 40);
    }

    let mut qs = q.clone();
    qs["stream"] = json!(true);
    qs["stream_options"] = json!({"include_usage": true});
    let r = post(a, "/v1/chat/completions", None, &qs);
    assert_eq!(r.status, 200);
    assert!(r.headers.to_ascii_lowercase().contains("content-type: text/event-stream"), "{}", r.headers);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut stream_finish = Value::Null;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(ch) = c["choices"].get(0) {
            streamed += ch["delta"]["content"].as_str().unwrap_or("");
            if !ch["finish_reason"].is_null() {
                stream_finish = ch["finish_reason"].clone();
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(stream_finish, finish);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], v["usage"]["completion_tokens"]);
    // The same prompt again: all of it but the last token comes from the cache.
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], json!(u["prompt_tokens"].as_u64().unwrap() - 1));

    // Stop strings: cut on the decoded text, not part of the output, finish_reason "stop".
    let r = post(
        a,
        "/v1/completions",
        None,
        &json!({"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 30, "temperature": 0, "stop": [" 7", "never"]}),
    );
    let v = r.json();
    let t = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(t.contains('5') && !t.contains('7'), "{t:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut s = json!({"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 30, "temperature": 0, "stop": " 7", "stream": true});
    let streamed: String = post(a, "/v1/completions", None, &s)
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(streamed, t);
    s["stream"] = json!(false);
    s["max_tokens"] = json!(3);
    assert_eq!(post(a, "/v1/completions", None, &s).json()["choices"][0]["finish_reason"], "length");

    // Logprobs (chat format): one entry per token, top alternatives sorted, the chosen one among them at
    // temperature 0.
    let r = post(
        a,
        "/v1/chat/completions",
        None,
        &json!({"messages": user("Hi"), "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    );
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
    for c in content {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], c["token"], "greedy picks the most likely token");
        assert!(c["logprob"].as_f64().unwrap() <= 0.0);
    }

    // n = 2: two choices with their own indexes; usage counts the prompt once.
    let v = post(
        a,
        "/v1/chat/completions",
        None,
        &json!({"messages": user("Say a word."), "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 5}),
    )
    .json();
    let idx: Vec<u64> = v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, vec![0, 1]);

    // A 5-turn conversation: from turn 2 on, the earlier turns come from the prefix cache.
    let mut messages = vec![json!({"role": "system", "content": "You are a concise assistant."})];
    let questions = ["Hi! What is your name?", "What is 2 + 2?", "Name a fruit.", "What color is the sky?", "Thanks, bye!"];
    for (turn, qn) in questions.iter().enumerate() {
        messages.push(json!({"role": "user", "content": qn}));
        let v = post(a, "/v1/chat/completions", None, &json!({"messages": messages, "max_tokens": 24, "temperature": 0})).json();
        let reply = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let (prompt, cached) =
            (v["usage"]["prompt_tokens"].as_u64().unwrap(), v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap());
        eprintln!("turn {}: prompt {prompt} tokens, cached {cached}", turn + 1);
        if turn > 0 {
            assert!(cached > 0, "turn {}: no cached tokens", turn + 1);
            assert!(cached < prompt);
        }
        messages.push(json!({"role": "assistant", "content": reply}));
    }
    assert!(metric(a, None, "pagellm_prefix_cache_hit_rate") > 0.0);
    assert!(metric(a, None, "pagellm_prompt_tokens_cached_total") > 0.0);
}

#[test]
fn official_openai_python_client() {
    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    let has_openai = Command::new("python3").args(["-c", "import openai"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !has_openai {
        assert!(std::env::var_os("CI").is_none(), "the openai Python package is missing in CI: .ci/run must pip install openai");
        println!("skipped: the openai Python package is not installed (pip install openai)");
        return;
    }
    let srv = Server::start(&model, &["-c", "2048", "--api-key", KEY]);
    let script = common::root().join("tests/server_openai.py");
    let out =
        Command::new("python3").arg(&script).args(["--base-url", &format!("http://{}/v1", srv.addr), "--api-key", KEY]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "tests/server_openai.py failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("passed, 0 failed"), "{stdout}");
}

/// The scheduler's contract in process (what the batching engine must keep): per choice, tokens then
/// one Done whose usage counts them; texts add up to the decoded reply; the queue bound; a dropped
/// waiting ticket frees its place at once; a dropped running ticket stops its generation.
#[test]
fn scheduler_contract_in_process() {
    use pagellm::cli::generate;
    use pagellm::engine::scheduler::{Event, Request, Scheduler, SchedulerOptions, SubmitError};
    use pagellm::engine::{Engine, EngineOptions, FinishReason};
    use pagellm::sampling::SamplingParams;

    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    let lm = generate::load(&model, 512, 1, None).unwrap();
    let tok = Arc::new(lm.tokenizer);
    let engine = Engine::new(lm.model, tok.eog_ids().to_vec(), EngineOptions { ctx: 512, prefix_cache: true, budget: None }).unwrap();
    let sched = Scheduler::spawn(engine, tok.clone(), SchedulerOptions { ctx: 512, max_queue: 1, max_n: 4, max_running: 1 }).unwrap();
    let prompt = tok.encode("Count: 1, 2, 3,", true, true).unwrap();
    let req = |max_tokens: usize, n: usize| Request {
        prompt: prompt.clone(),
        n,
        max_tokens: Some(max_tokens),
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        logprobs: None,
        json_object: false,
        kv_budget: None,
    };

    // Two choices, in order: tokens then Done, the usage counting them, the text the decoded tokens.
    let mut t = sched.submit(req(6, 2)).unwrap();
    let (mut ids, mut texts, mut dones) = (vec![Vec::new(); 2], vec![String::new(); 2], Vec::new());
    while let Some(ev) = t.blocking_recv() {
        match ev {
            Event::Token { index, id, text, logprob, .. } => {
                assert!(logprob.is_none());
                ids[index].push(id);
                texts[index] += &text;
            }
            Event::Done { index, text, finish_reason, usage } => {
                texts[index] += &text;
                assert_eq!(
                    (finish_reason, usage.completion_tokens, usage.prompt_tokens),
                    (FinishReason::Length, ids[index].len(), prompt.len())
                );
                dones.push((index, usage.cached_tokens));
            }
            Event::Error { message } => panic!("{message}"),
        }
    }
    assert_eq!(dones.iter().map(|d| d.0).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(dones[1].1, prompt.len() - 1, "the second choice re-uses the prompt");
    assert_eq!(ids[0], ids[1], "greedy choices agree");
    assert_eq!(texts[0], tok.decode(&ids[0]));

    // Refusals at submit.
    assert!(matches!(sched.submit(Request { prompt: vec![1; 600], ..req(1, 1) }), Err(SubmitError::PromptTooLong { .. })));
    assert!(matches!(sched.submit(req(600, 1)), Err(SubmitError::MaxTokensTooLarge { .. })));

    // The queue: A runs, B waits, C is refused; dropping B makes room for C at once.
    let mut a = sched.submit(req(400, 1)).unwrap();
    assert!(matches!(a.blocking_recv(), Some(Event::Token { .. })), "A is running");
    let b = sched.submit(req(4, 1)).unwrap();
    assert_eq!(sched.submit(req(4, 1)).err(), Some(SubmitError::QueueFull { max_queue: 1 }));
    drop(b);
    let mut c = sched.submit(req(4, 1)).unwrap();
    // Dropping A stops its generation: C finishes long before A's 400 tokens could have been made.
    let t0 = Instant::now();
    drop(a);
    let mut got_done = false;
    while let Some(ev) = c.blocking_recv() {
        got_done |= matches!(ev, Event::Done { .. });
    }
    assert!(got_done);
    assert!(t0.elapsed() < Duration::from_secs(10), "C waited {:?}", t0.elapsed());
    // `running` drops just after the last event is sent.
    let t0 = Instant::now();
    while sched.stats().running > 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the scheduler still runs a finished request");
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = sched.stats();
    assert_eq!((s.waiting, s.running, s.rejected), (0, 0, 1));
    assert!(s.cancelled >= 2, "{s:?}");
}

/// The reply text and finish reason of a streamed chat completion (SSE events concatenated).
fn stream_chat(addr: &str, body: &Value) -> (String, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = post(addr, "/v1/chat/completions", None, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let (mut text, mut finish) = (String::new(), String::new());
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text += c;
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

/// Waits until no request runs, then asserts the pool holds no block of a request (only the retained
/// finished sequences) and its invariants held.
fn assert_idle_and_no_leak(addr: &str) {
    let t = Instant::now();
    while metric(addr, None, "pagellm_requests_running") > 0.0 || metric(addr, None, "pagellm_sequences_running") > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the server never went idle");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(addr, None, "pagellm_kv_blocks_used_by_requests"), 0.0, "leaked KV blocks");
    assert_eq!(metric(addr, None, "pagellm_kv_invariant_errors_total"), 0.0);
    let (used, free, total) = (
        metric(addr, None, "pagellm_kv_blocks_used"),
        metric(addr, None, "pagellm_kv_blocks_free"),
        metric(addr, None, "pagellm_kv_blocks_total"),
    );
    assert_eq!(used + free, total);
}

/// Continuous batching: 16 concurrent streaming clients (different prompts, greedy) all finish, each
/// reply identical to the same request run alone on a fresh server (batch invariance, DESIGN.md), and
/// the steps really batched several sequences.
#[test]
fn sixteen_concurrent_streams_match_solo_runs() {
    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    let topics = [
        "the sea", "a cat", "Paris", "winter", "bread", "a robot", "the moon", "coffee", "trains", "music", "a forest",
        "chess", "rain", "a library", "bees", "the desert",
    ];
    let bodies: Vec<Value> = topics
        .iter()
        .map(|t| json!({"messages": user(&format!("Write one sentence about {t}.")), "max_tokens": 32, "temperature": 0}))
        .collect();

    let batched: Vec<(String, String)> = {
        let srv = Server::start(&model, &["-c", "2048"]);
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| {
                let (addr, b) = (srv.addr.clone(), b.clone());
                std::thread::spawn(move || stream_chat(&addr, &b))
            })
            .collect();
        let out = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let (steps, seqs) = (metric(&srv.addr, None, "pagellm_steps_total"), metric(&srv.addr, None, "pagellm_step_sequences_total"));
        println!("{steps} steps, {:.1} sequences per step", seqs / steps);
        assert!(seqs / steps > 4.0, "the 16 clients were not batched: {seqs} sequences over {steps} steps");
        assert_idle_and_no_leak(&srv.addr);
        out
    };
    let srv = Server::start(&model, &["-c", "2048"]);
    for (i, (b, got)) in bodies.iter().zip(&batched).enumerate() {
        let alone = stream_chat(&srv.addr, b);
        assert!(!alone.0.is_empty());
        assert_eq!(got, &alone, "client {i} ({}): batched reply differs from the solo run", topics[i]);
    }
}

/// Faults under load on a small pool (so sequences get preempted): streaming clients that leave after
/// their first token, garbage bodies, a 1 MB prompt, and more work than the pool holds. The server keeps
/// serving, the preempted requests' greedy replies equal their solo runs, and once idle no KV block is
/// held by a request.
#[test]
fn faults_and_preemption_leak_nothing() {
    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    // 12 MiB of KV: ~540 tokens, 34 blocks; 6 clients x ~150 tokens need far more.
    let srv = Server::start(&model, &["-c", "256", "--kv-mem", "12"]);
    let a = srv.addr.clone();
    let bodies: Vec<Value> = ["a dog", "the sun", "a castle", "tea", "snow", "a ship"]
        .iter()
        .map(|t| json!({"messages": user(&format!("Tell a short story about {t}.")), "max_tokens": 120, "temperature": 0}))
        .collect();
    let load: Vec<_> = bodies
        .iter()
        .map(|b| {
            let (addr, b) = (a.clone(), b.clone());
            std::thread::spawn(move || stream_chat(&addr, &b))
        })
        .collect();
    // Meanwhile: clients that leave mid-stream, garbage, a 1 MB prompt.
    for i in 0..3 {
        let s = open_stream_until_first_token(&a, None, "/v1/completions", &json!({"prompt": format!("{i}: Count: 1, 2, 3,"), "max_tokens": 200, "stream": true}));
        drop(s);
    }
    expect_error(&request(&a, "POST", "/v1/chat/completions", None, b"{\"messages\": [garbage"), 400, None);
    expect_error(&request(&a, "POST", "/v1/completions", None, &[0xff, 0xfe, 0x00, 0x01]), 400, None);
    expect_error(&post(&a, "/v1/chat/completions", None, &json!({"messages": 42})), 400, None);
    expect_error(&post(&a, "/v1/completions", None, &json!({"prompt": "x ".repeat(500_000)})), 400, Some("prompt"));
    let mut g = TcpStream::connect(&a).unwrap();
    let _ = g.write_all(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999\r\n\r\n{\"prompt\":");
    drop(g);

    let replies: Vec<(String, String)> = load.into_iter().map(|h| h.join().unwrap()).collect();
    for (text, finish) in &replies {
        assert!(!text.is_empty() && (finish == "stop" || finish == "length"), "{finish}: {text:?}");
    }
    assert!(metric(&a, None, "pagellm_preemptions_total") > 0.0, "the pool never ran short: make it smaller");
    assert_idle_and_no_leak(&a);
    // Preemption does not change a greedy reply.
    for i in [0, 5] {
        assert_eq!(stream_chat(&a, &bodies[i]), replies[i], "client {i}: the reply changed under preemption");
    }
    assert_eq!(get(&a, "/health", None).status, 200);
    assert_idle_and_no_leak(&a);
}

/// 8 concurrent requests sharing a long system prompt: one computes it, the other 7 wait for its blocks
/// and re-use them (llama-server with 8 slots, measured: 1 of 8 re-used an 820-token system prompt).
#[test]
fn concurrent_requests_share_a_system_prompt() {
    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    let srv = Server::start(&model, &["-c", "2048"]);
    let system = "You are a careful assistant for a public library. ".repeat(20);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let addr = srv.addr.clone();
            let body = json!({
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": format!("Question {i}: what opens at {i} o'clock?")}],
                "max_tokens": 4, "temperature": 0,
            });
            std::thread::spawn(move || post(&addr, "/v1/chat/completions", None, &body))
        })
        .collect();
    let cached: Vec<(u64, u64)> = handles
        .into_iter()
        .map(|h| {
            let r = h.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            let u = &r.json()["usage"];
            (u["prompt_tokens"].as_u64().unwrap(), u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap())
        })
        .collect();
    println!("(prompt, cached) per request: {cached:?}");
    let reused = cached.iter().filter(|&&(p, c)| c >= p / 2 && c > 100).count();
    assert!(reused >= 7, "only {reused} of 8 re-used the shared system prompt: {cached:?}");
    assert_idle_and_no_leak(&srv.addr);
}

/// `response_format: json_object`: greedy replies are one JSON object ending with `stop`; sampled choices
/// (forks of one prompt, streamed) are each a valid prefix of one, and one whenever they stop.
#[test]
fn json_object_replies_are_one_object() {
    use pagellm::json_constraint::JsonState;

    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    let srv = Server::start(&model, &["-c", "2048"]);
    let a = srv.addr.as_str();
    let rf = json!({"type": "json_object"});
    // (Asked plainly, "List three colors as JSON.", the 135M model nests {"type": "json", "data": ...}
    // without end: the mask keeps it valid, but it runs to max_tokens.)
    for q in [
        "Return a JSON object with a key \"colors\" whose value is a list of three colors.",
        "Give a JSON object with the name and age of a fictional person.",
    ] {
        let r = post(a, "/v1/chat/completions", None, &json!({"messages": user(q), "temperature": 0, "max_tokens": 200, "response_format": rf}));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        println!("{q} -> {content:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{content:?}");
        let obj: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("not JSON ({e}): {content:?}"));
        assert!(obj.is_object(), "{content:?}");
    }

    let body = json!({"messages": user("Describe a cat as JSON."), "temperature": 1.0, "seed": 5, "n": 3, "max_tokens": 120,
        "response_format": rf, "stream": true});
    let r = post(a, "/v1/chat/completions", None, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let mut texts = vec![String::new(); 3];
    let mut finish = vec![String::new(); 3];
    for e in r.events().iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            texts[i] += ch["delta"]["content"].as_str().unwrap_or("");
            if let Some(f) = ch["finish_reason"].as_str() {
                finish[i] = f.to_string();
            }
        }
    }
    for (text, finish) in texts.iter().zip(&finish) {
        println!("{finish}: {text:?}");
        let mut st = JsonState::new();
        assert!(st.feed(text.as_bytes()), "not a prefix of a JSON object: {text:?}");
        match finish.as_str() {
            "stop" => assert!(serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()), "{text:?}"),
            "length" => assert!(!st.is_complete(), "{text:?}"),
            other => panic!("finish_reason {other}"),
        }
    }
    assert!(srv.log_has("(json_object)"), "the log line does not mention json_object");
    assert_idle_and_no_leak(a);
}

/// The JSON mask's cost per step on the real vocabularies (49k and 262k tokens), in a few states.
/// `cargo test --release --test server json_mask_time -- --ignored --nocapture`
#[test]
#[ignore]
fn json_mask_time_per_step() {
    use pagellm::gguf::GgufFile;
    use pagellm::json_constraint::{JsonMask, JsonState};
    use pagellm::tokenizer::Tokenizer;

    for rel in [common::SMOLLM2, common::GEMMA3] {
        let Some(model) = common::model_or_skip(rel) else { continue };
        let tok = Tokenizer::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
        let t = Instant::now();
        let mask = JsonMask::for_tokenizer(&tok, tok.eog_ids());
        println!("{rel}: {} tokens, mask built in {:.1} ms", tok.n_vocab(), t.elapsed().as_secs_f64() * 1e3);
        for prefix in ["", "{", "{\"name\": \"Al", "{\"name\": ", "{\"a\": [1, 2.5", "{\"a\": {\"b\": true}"] {
            let mut st = JsonState::new();
            assert!(st.feed(prefix.as_bytes()));
            let mut logits = vec![0.0f32; tok.n_vocab()];
            let reps = 20;
            let t = Instant::now();
            let mut allowed = 0;
            for _ in 0..reps {
                logits.iter_mut().for_each(|l| *l = 0.0);
                allowed = mask.apply(&st, &mut logits);
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            println!("  after {prefix:?}: {allowed} allowed, {ms:.2} ms per step");
        }
    }
}

/// `--kv-budget` on the server and the per-request `kv_budget`/`kv_policy` extension fields: replies
/// longer than the budget run to their end (the server's budget, a request's own, a request's 0 = keep
/// all), and a budget too small, a policy without a budget or an unknown policy is a 400 naming the field.
#[test]
fn kv_budget_per_request() {
    let Some(model) = common::model_or_skip(common::SMOLLM2) else { return };
    let srv = Server::start(&model, &["-c", "1024", "--kv-budget", "64", "--kv-policy", "sinks"]);
    let a = srv.addr.as_str();
    for extra in [json!({}), json!({"kv_budget": 48, "kv_policy": "h2o"}), json!({"kv_budget": 0})] {
        let mut body = json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 150, "ignore_eos": true});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = post(a, "/v1/completions", None, &body);
        assert_eq!(r.status, 200, "{extra}: {}", r.body);
        let v = r.json();
        let n = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(n > 64 || v["choices"][0]["finish_reason"] == "stop", "{extra}: {n} tokens");
    }
    let r = post(a, "/v1/completions", None, &json!({"prompt": "x", "kv_budget": 3}));
    expect_error(&r, 400, Some("kv_budget"));
    let r = post(a, "/v1/completions", None, &json!({"prompt": "x", "kv_policy": "sinks"}));
    expect_error(&r, 400, Some("kv_policy"));
    let r = post(a, "/v1/completions", None, &json!({"prompt": "x", "kv_budget": 64, "kv_policy": "lru"}));
    expect_error(&r, 400, Some("kv_policy"));
}
