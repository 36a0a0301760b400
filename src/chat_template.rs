//! Chat templates: render a conversation into the prompt text a model was trained on.
//!
//! The GGUF's own `tokenizer.chat_template` (Jinja) is rendered with `minijinja`, with Python's string
//! methods (`.strip()`, `.startswith()`, ...) that Hugging Face templates use. A file without a template
//! gets a built-in one for its architecture (gemma's turn format, llama3, or chatml), and the caller is
//! told which; `--chat-template FILE` overrides both.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template does not parse: {0}")]
    Parse(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

/// Where a template came from, so the CLI can say so.
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateSource {
    Gguf,
    File(String),
    BuiltIn(&'static str),
}

pub struct ChatTemplate {
    source: String,
    pub origin: TemplateSource,
    pub bos_token: String,
    pub eos_token: String,
}

/// Gemma's turn format; BOS is left to the tokenizer's add_bos.
const GEMMA: &str = "{% for m in messages %}{% if m.role != 'system' %}\
<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n\
{% if loop.index0 == 1 and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}{{ m.content | trim }}<end_of_turn>\n\
{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

const LLAMA3: &str = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}\
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

impl ChatTemplate {
    /// The file's template if it has one, else a built-in one chosen by architecture and vocabulary.
    pub fn for_model(gguf_template: Option<&str>, arch: &str, has_token: impl Fn(&str) -> bool, bos: &str, eos: &str) -> ChatTemplate {
        let (source, origin) = match gguf_template {
            Some(t) => (t.to_string(), TemplateSource::Gguf),
            None if arch.starts_with("gemma") => (GEMMA.to_string(), TemplateSource::BuiltIn("gemma")),
            None if has_token("<|start_header_id|>") => (LLAMA3.to_string(), TemplateSource::BuiltIn("llama3")),
            None => (CHATML.to_string(), TemplateSource::BuiltIn("chatml")),
        };
        ChatTemplate { source, origin, bos_token: bos.into(), eos_token: eos.into() }
    }

    pub fn from_file(path: &str, bos: &str, eos: &str) -> std::io::Result<ChatTemplate> {
        let source = std::fs::read_to_string(path)?;
        Ok(ChatTemplate { source, origin: TemplateSource::File(path.into()), bos_token: bos.into(), eos_token: eos.into() })
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source).map_err(|e| TemplateError::Parse(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| TemplateError::Parse(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| TemplateError::Render(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_builtin_renders_turns_and_folds_system_into_the_first_user_turn() {
        let t = ChatTemplate::for_model(None, "gemma3", |_| false, "<bos>", "<eos>");
        assert_eq!(t.origin, TemplateSource::BuiltIn("gemma"));
        let msgs = [Message::new("system", "Be brief."), Message::new("user", "Hi "), Message::new("assistant", "Hello."), Message::new("user", "Bye")];
        let s = t.render(&msgs, true).unwrap();
        assert_eq!(
            s,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn gguf_template_with_python_methods_renders() {
        let src = "{% for m in messages %}{{ m.content.strip().upper() }}|{% endfor %}{{ bos_token }}";
        let t = ChatTemplate::for_model(Some(src), "llama", |_| false, "<s>", "</s>");
        assert_eq!(t.render(&[Message::new("user", "  hi  ")], false).unwrap(), "HI|<s>");
    }

    #[test]
    fn chatml_and_llama3_fallbacks() {
        let m = [Message::new("user", "x")];
        let c = ChatTemplate::for_model(None, "qwen2", |_| false, "", "");
        assert_eq!(c.render(&m, true).unwrap(), "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
        let l = ChatTemplate::for_model(None, "llama", |t| t == "<|start_header_id|>", "", "");
        assert_eq!(l.origin, TemplateSource::BuiltIn("llama3"));
        assert!(l.render(&m, true).unwrap().ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    #[test]
    fn raise_exception_and_bad_syntax_are_errors() {
        let t = ChatTemplate::for_model(Some("{{ raise_exception('no system role') }}"), "llama", |_| false, "", "");
        assert!(t.render(&[], false).unwrap_err().to_string().contains("no system role"));
        let bad = ChatTemplate::for_model(Some("{% for %}"), "llama", |_| false, "", "");
        assert!(matches!(bad.render(&[], false), Err(TemplateError::Parse(_))));
    }
}
