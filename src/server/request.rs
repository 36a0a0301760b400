//! Request bodies of `/v1/chat/completions` and `/v1/completions`, read by hand from a
//! `serde_json::Value` so that every error names the field at fault ("'temperature' must be a number,
//! not a string"). Unknown fields are ignored (clients send many); fields this server cannot honour are
//! refused rather than silently dropped. `response_format: json_object` is enforced: the scheduler masks
//! each step's logits so that every reply is one JSON object (json_constraint.rs); `json_schema` is
//! refused.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::chat_template::Message;
use crate::kv::{KvBudget, KvPolicy, DEFAULT_BLOCK_SIZE, DEFAULT_RECENT};
use crate::sampling::SamplingParams;

/// Most stop strings per request.
pub const MAX_STOP: usize = 16;

/// What both endpoints share: how much to generate, how to sample, how to answer.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage (and `"usage": null` on the others).
    pub include_usage: bool,
    pub stop: Vec<String>,
    /// The server's defaults (its sampling flags) overridden by the request's fields.
    pub sampling: SamplingParams,
    /// `Some(k)`: logprobs with `k` alternatives per token.
    pub logprobs: Option<usize>,
    /// `response_format: {"type": "json_object"}`: every reply is one JSON object.
    pub json_object: bool,
    /// Extension fields `kv_budget` (tokens kept, 0: keep all) and `kv_policy` (`h2o`, `sinks`,
    /// `none`): this request's KV budget instead of the server's `--kv-budget`.
    pub kv_budget: Option<KvBudget>,
    /// Things the log line should mention (e.g. that the reply was held to a JSON object).
    pub notes: Vec<&'static str>,
}

pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub params: GenParams,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub struct CompletionRequest {
    pub prompts: Vec<Prompt>,
    pub params: GenParams,
}

/// The body as a JSON object, or a 400 that says why not.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ApiError {
        code: Some("invalid_json"),
        ..ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::invalid(None, format!("the request body must be a JSON object, not {}", type_name(&other)))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed, field-named access to a JSON object; `null` reads as absent, as OpenAI treats it.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        let x = v.as_f64().ok_or_else(|| ApiError::wrong_type(name, "a number", v))?;
        if !(lo..=hi).contains(&x) {
            return Err(ApiError::invalid(Some(name), format!("'{name}' must be between {lo} and {hi}, not {x}")));
        }
        Ok(Some(x as f32))
    }

    fn uint(&self, name: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        let x = int_value(v).ok_or_else(|| ApiError::wrong_type(name, "an integer", v))?;
        if x < lo as i128 || x > hi as i128 {
            return Err(ApiError::invalid(Some(name), format!("'{name}' must be between {lo} and {hi}, not {x}")));
        }
        Ok(Some(x as u64))
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        v.as_bool().map(Some).ok_or_else(|| ApiError::wrong_type(name, "a boolean", v))
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        v.as_str().map(Some).ok_or_else(|| ApiError::wrong_type(name, "a string", v))
    }

    fn object(&self, name: &str) -> Result<Option<Fields<'a>>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        v.as_object().map(|m| Some(Fields(m))).ok_or_else(|| ApiError::wrong_type(name, "an object", v))
    }

    /// Fields that must be absent or empty (`[]`, `{}`, `""`) because the server cannot honour them.
    fn refuse_nonempty(&self, name: &str, what: &str) -> Result<(), ApiError> {
        let empty = match self.get(name) {
            None => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        };
        if empty {
            Ok(())
        } else {
            Err(ApiError::unsupported(name, what))
        }
    }
}

/// An integer JSON number (an integral float like 5.0 counts, as Python clients may send it).
fn int_value(v: &Value) -> Option<i128> {
    if let Some(i) = v.as_i64() {
        return Some(i as i128);
    }
    if let Some(u) = v.as_u64() {
        return Some(u as i128);
    }
    v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i128)
}

/// The fields both endpoints read. `max_n` bounds `n`.
fn parse_common(f: &Fields, defaults: &SamplingParams, max_n: usize) -> Result<GenParams, ApiError> {
    f.string("model")?;
    let mut s = defaults.clone();
    if let Some(t) = f.number("temperature", 0.0, 2.0)? {
        s.temperature = t;
    }
    if let Some(p) = f.number("top_p", 0.0, 1.0)? {
        s.top_p = p;
    }
    if let Some(k) = f.uint("top_k", 0, u32::MAX as u64)? {
        s.top_k = k as usize;
    }
    if let Some(p) = f.number("min_p", 0.0, 1.0)? {
        s.min_p = p;
    }
    if let Some(p) = f.number("presence_penalty", -2.0, 2.0)? {
        s.presence_penalty = p;
    }
    if let Some(p) = f.number("frequency_penalty", -2.0, 2.0)? {
        s.frequency_penalty = p;
    }
    if let Some(p) = f.number("repeat_penalty", 0.0, 10.0)? {
        s.repeat_penalty = if p == 0.0 { 1.0 } else { p };
    }
    // No seed (or a negative one, llama-server's -1): a fresh random seed per request.
    s.seed = match f.get("seed") {
        None => rand::random(),
        Some(v) => match int_value(v) {
            Some(i) if i < 0 => rand::random(),
            Some(i) => i as u64,
            None => return Err(ApiError::wrong_type("seed", "an integer", v)),
        },
    };
    let max_tokens = f.uint("max_completion_tokens", 1, u32::MAX as u64)?.or(f.uint("max_tokens", 1, u32::MAX as u64)?);
    let n = f.uint("n", 1, max_n as u64)?.unwrap_or(1) as usize;
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        Some(o) => {
            o.boolean("include_usage").map_err(|e| ApiError { param: Some("stream_options.include_usage".into()), ..e })?.unwrap_or(false)
        }
        None => false,
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for v in a {
                match v.as_str() {
                    Some(s) => out.push(s.to_string()),
                    None => return Err(ApiError::wrong_type("stop", "a string or a list of strings", v)),
                }
            }
            out
        }
        Some(v) => return Err(ApiError::wrong_type("stop", "a string or a list of strings", v)),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(Some("stop"), format!("at most {MAX_STOP} stop strings are allowed, not {}", stop.len())));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(Some("stop"), "a stop string must not be empty"));
    }
    f.refuse_nonempty("logit_bias", "logit_bias")?;
    let mut notes = Vec::new();
    let mut json_object = false;
    if let Some(rf) = f.object("response_format")? {
        match rf.string("type").map_err(|e| ApiError { param: Some("response_format.type".into()), ..e })? {
            None | Some("text") => {}
            Some("json_object") => {
                json_object = true;
                notes.push("json_object");
            }
            Some("json_schema") => return Err(ApiError::unsupported("response_format", "response_format json_schema")),
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("response_format"),
                    format!("unknown response_format type '{other}' (use 'text' or 'json_object')"),
                ))
            }
        }
    }
    let kv_budget = kv_budget(f)?;
    Ok(GenParams { max_tokens: max_tokens.map(|m| m as usize), n, stream, include_usage, stop, sampling: s, logprobs: None, json_object, kv_budget, notes })
}

/// The `kv_budget` / `kv_policy` extension fields (pagellm's, like llama-server's own extras).
fn kv_budget(f: &Fields) -> Result<Option<KvBudget>, ApiError> {
    let tokens = f.uint("kv_budget", 0, u32::MAX as u64)?;
    let policy = match f.string("kv_policy")? {
        None => None,
        Some(p) => Some(p.parse::<KvPolicy>().map_err(|e| ApiError::invalid(Some("kv_policy"), e))?),
    };
    let budget = match (tokens, policy) {
        (None, None) => return Ok(None),
        (Some(0), _) | (_, Some(KvPolicy::None)) => KvBudget { tokens: 0, policy: KvPolicy::None },
        (Some(t), p) => KvBudget { tokens: t as usize, policy: p.unwrap_or(KvPolicy::H2o { recent: DEFAULT_RECENT }) },
        (None, Some(_)) => return Err(ApiError::invalid(Some("kv_policy"), "'kv_policy' needs 'kv_budget' (the tokens to keep)")),
    };
    budget.check(DEFAULT_BLOCK_SIZE).map_err(|e| ApiError::invalid(Some("kv_budget"), e))?;
    Ok(Some(budget))
}

impl ChatRequest {
    pub fn parse(body: &Map<String, Value>, defaults: &SamplingParams, max_n: usize, max_top: usize) -> Result<ChatRequest, ApiError> {
        let f = Fields(body);
        let mut params = parse_common(&f, defaults, max_n)?;
        f.refuse_nonempty("tools", "tool calling ('tools')")?;
        f.refuse_nonempty("functions", "function calling ('functions')")?;
        let logprobs = f.boolean("logprobs")?.unwrap_or(false);
        let top = f.uint("top_logprobs", 0, max_top as u64)?;
        if top.is_some() && !logprobs {
            return Err(ApiError::invalid(Some("top_logprobs"), "'top_logprobs' needs 'logprobs': true"));
        }
        params.logprobs = logprobs.then(|| top.unwrap_or(0) as usize);
        let messages = parse_messages(f.get("messages"))?;
        Ok(ChatRequest { messages, params })
    }
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let Some(v) = v else { return Err(ApiError::invalid(Some("messages"), "'messages' is required")) };
    let list = v.as_array().ok_or_else(|| ApiError::wrong_type("messages", "an array of messages", v))?;
    if list.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "'messages' must hold at least one message"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let m = m.as_object().ok_or_else(|| ApiError::wrong_type(&at, "an object", m))?;
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            Some(v) => return Err(ApiError::wrong_type(&format!("{at}.role"), "a string", v)),
            None => return Err(ApiError::invalid(Some(&format!("{at}.role")), format!("'{at}.role' is required"))),
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" | "function" => return Err(ApiError::unsupported(&format!("{at}.role"), &format!("the '{role}' role"))),
            other => {
                return Err(ApiError::invalid(
                    Some(&format!("{at}.role")),
                    format!("unknown role '{other}' (use system, developer, user or assistant)"),
                ))
            }
        };
        let content = parse_content(m.get("content").filter(|c| !c.is_null()), &at, role)?;
        out.push(Message::new(role, &content));
    }
    Ok(out)
}

/// A message's content: a string, or a list of `{"type": "text", "text": ...}` parts (joined by "\n").
fn parse_content(v: Option<&Value>, at: &str, role: &str) -> Result<String, ApiError> {
    let param = format!("{at}.content");
    match v {
        None if role == "assistant" => Ok(String::new()),
        None => Err(ApiError::invalid(Some(&param), format!("'{param}' is required"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                let pat = format!("{param}[{j}]");
                let p = p.as_object().ok_or_else(|| ApiError::wrong_type(&pat, "a content part object", p))?;
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => match p.get("text") {
                        Some(Value::String(t)) => texts.push(t.as_str()),
                        Some(t) => return Err(ApiError::wrong_type(&format!("{pat}.text"), "a string", t)),
                        None => return Err(ApiError::invalid(Some(&format!("{pat}.text")), format!("'{pat}.text' is required"))),
                    },
                    Some(other) => return Err(ApiError::unsupported(&pat, &format!("content of type '{other}' (only text)"))),
                    None => return Err(ApiError::invalid(Some(&format!("{pat}.type")), format!("'{pat}.type' is required"))),
                }
            }
            Ok(texts.join("\n"))
        }
        Some(v) => Err(ApiError::wrong_type(&param, "a string or a list of content parts", v)),
    }
}

impl CompletionRequest {
    pub fn parse(
        body: &Map<String, Value>,
        defaults: &SamplingParams,
        max_n: usize,
        max_top: usize,
    ) -> Result<CompletionRequest, ApiError> {
        let f = Fields(body);
        let mut params = parse_common(&f, defaults, max_n)?;
        params.logprobs = f.uint("logprobs", 0, max_top as u64)?.map(|k| k as usize);
        if f.boolean("echo")?.unwrap_or(false) {
            return Err(ApiError::unsupported("echo", "echo"));
        }
        f.refuse_nonempty("suffix", "suffix (fill-in-the-middle)")?;
        if let Some(b) = f.uint("best_of", 1, max_n as u64)? {
            if b as usize != params.n {
                return Err(ApiError::unsupported("best_of", "best_of other than n"));
            }
        }
        let prompts = parse_prompts(f.get("prompt"))?;
        Ok(CompletionRequest { prompts, params })
    }
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of lists of token ids.
fn parse_prompts(v: Option<&Value>) -> Result<Vec<Prompt>, ApiError> {
    const WHAT: &str = "a string, a list of strings, or token ids";
    let Some(v) = v else { return Err(ApiError::invalid(Some("prompt"), "'prompt' is required")) };
    let ids = |a: &Vec<Value>| -> Option<Vec<u32>> { a.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect() };
    match v {
        Value::String(s) => Ok(vec![Prompt::Text(s.clone())]),
        Value::Array(a) if a.is_empty() => Err(ApiError::invalid(Some("prompt"), "'prompt' must not be an empty list")),
        Value::Array(a) if a.iter().all(Value::is_string) => {
            Ok(a.iter().map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string())).collect())
        }
        Value::Array(a) if a.iter().all(Value::is_number) => {
            ids(a).map(|t| vec![Prompt::Tokens(t)]).ok_or_else(|| ApiError::wrong_type("prompt", WHAT, v))
        }
        Value::Array(a) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|p| match p {
                Value::Array(t) if !t.is_empty() => ids(t).map(Prompt::Tokens),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::wrong_type("prompt", WHAT, v)),
        _ => Err(ApiError::wrong_type("prompt", WHAT, v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(v: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(v.as_object().unwrap(), &SamplingParams::default(), 8, 20)
    }

    #[test]
    fn kv_budget_fields() {
        let with = |extra: Value| {
            let mut v = json!({"messages": [{"role": "user", "content": "x"}]});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            chat(v).map(|r| r.params.kv_budget)
        };
        assert_eq!(with(json!({})).unwrap(), None);
        assert_eq!(with(json!({"kv_budget": 64})).unwrap(), Some(KvBudget { tokens: 64, policy: KvPolicy::H2o { recent: DEFAULT_RECENT } }));
        assert_eq!(with(json!({"kv_budget": 64, "kv_policy": "sinks"})).unwrap().unwrap().policy, KvPolicy::Sinks { sinks: 4 });
        assert_eq!(with(json!({"kv_budget": 0})).unwrap().unwrap().policy, KvPolicy::None);
        assert_eq!(with(json!({"kv_budget": 8})).unwrap_err().param.as_deref(), Some("kv_budget"));
        assert_eq!(with(json!({"kv_policy": "h2o"})).unwrap_err().param.as_deref(), Some("kv_policy"));
        assert_eq!(with(json!({"kv_budget": "64"})).unwrap_err().param.as_deref(), Some("kv_budget"));
    }

    #[test]
    fn chat_fields_are_read_and_checked() {
        let r = chat(json!({
            "model": "x", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "temperature": 0, "max_tokens": 5, "stop": "\n", "seed": 3, "n": 2, "logprobs": true, "top_logprobs": 2,
            "stream": true, "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert_eq!(r.messages[1].content, "a\nb");
        let p = r.params;
        assert_eq!((p.max_tokens, p.n, p.stream, p.include_usage, p.logprobs), (Some(5), 2, true, true, Some(2)));
        assert_eq!((p.sampling.temperature, p.sampling.seed, p.stop), (0.0, 3, vec!["\n".to_string()]));

        let err = |v: Value| chat(v).err().unwrap();
        let e = err(json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}));
        assert_eq!((e.param.as_deref(), e.status.as_u16()), (Some("temperature"), 400));
        assert!(e.message.contains("'temperature' must be a number, not a string"), "{}", e.message);
        assert_eq!(err(json!({"messages": "hi"})).param.as_deref(), Some("messages"));
        assert_eq!(err(json!({"messages": [{"role": "user", "content": 5}]})).param.as_deref(), Some("messages[0].content"));
        assert_eq!(err(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})).param.as_deref(), Some("max_tokens"));
        assert_eq!(err(json!({"messages": [{"role": "user", "content": "x"}], "n": 100})).param.as_deref(), Some("n"));
        assert_eq!(err(json!({"messages": [{"role": "user", "content": "x"}], "stop": [1]})).param.as_deref(), Some("stop"));
        assert_eq!(err(json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})).param.as_deref(), Some("top_logprobs"));
        assert_eq!(err(json!({"messages": [{"role": "tool", "content": "x"}]})).code, Some("unsupported_parameter"));
        assert!(chat(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})).unwrap().params.json_object);
        assert!(!chat(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text"}})).unwrap().params.json_object);
    }

    #[test]
    fn prompts_take_every_openai_shape() {
        let p = |v: Value| parse_prompts(Some(&v));
        assert_eq!(p(json!("a")).unwrap(), vec![Prompt::Text("a".into())]);
        assert_eq!(p(json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(p(json!([1, 2])).unwrap(), vec![Prompt::Tokens(vec![1, 2])]);
        assert_eq!(p(json!([[1], [2, 3]])).unwrap().len(), 2);
        assert!(p(json!([1, "a"])).is_err());
        assert!(p(json!([-1])).is_err());
        assert!(p(json!({})).is_err());
    }

    #[test]
    fn malformed_bodies_are_400() {
        assert_eq!(parse_object(b"{nope").unwrap_err().status.as_u16(), 400);
        assert!(parse_object(b"[1]").unwrap_err().message.contains("an array"));
    }
}
