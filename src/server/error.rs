//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}` with the status
//! OpenAI uses for each kind, so clients (the `openai` package maps status codes to exception classes)
//! react as they would to OpenAI.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::scheduler::SubmitError;

#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: "invalid_request_error", "authentication_error", "not_found_error", ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is wrong; `param` names the field.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// 400 for a field of the wrong JSON type.
    pub fn wrong_type(param: &str, expected: &str, got: &serde_json::Value) -> ApiError {
        let got = match got {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::Object(_) => "an object",
        };
        ApiError { code: Some("invalid_type"), ..ApiError::invalid(Some(param), format!("'{param}' must be {expected}, not {got}")) }
    }

    pub fn unsupported(param: &str, what: &str) -> ApiError {
        ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::invalid(Some(param), format!("{what} is not supported by this server"))
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("not_found"),
            ..ApiError::invalid(None, message)
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            ..ApiError::invalid(None, message)
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "server_error", ..ApiError::invalid(None, message) }
    }

    /// The JSON body (also sent as an SSE event when a stream fails after its headers).
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }

    /// A refusal from the scheduler; `prompt_param` is "messages" or "prompt".
    pub fn from_submit(e: &SubmitError, prompt_param: &str) -> ApiError {
        let message = e.to_string();
        match e {
            SubmitError::EmptyPrompt => ApiError::invalid(Some(prompt_param), message),
            SubmitError::PromptTooLong { .. } => {
                ApiError { code: Some("context_length_exceeded"), ..ApiError::invalid(Some(prompt_param), message) }
            }
            SubmitError::MaxTokensTooLarge { .. } => {
                ApiError { code: Some("context_length_exceeded"), ..ApiError::invalid(Some("max_tokens"), message) }
            }
            SubmitError::OutOfRange { what, .. } => ApiError::invalid(Some(what), message),
            SubmitError::QueueFull { .. } => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "server_busy",
                code: Some("queue_full"),
                ..ApiError::invalid(None, message)
            },
            SubmitError::ShuttingDown => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: Some("shutting_down"),
                ..ApiError::invalid(None, message)
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        resp.extensions_mut().insert(super::LogNote(format!("error: {}", self.message)));
        resp
    }
}
