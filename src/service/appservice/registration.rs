//! An application service registration (the YAML file every bridge writes; the admin API takes
//! the same fields as JSON), its validation, and its namespaces compiled to regexes.

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

/// The registration as the bridge wrote it. Unknown fields (bridges add their own) are ignored.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Registration {
    pub id: String,
    /// Where the appservice listens; `null` for one that only uses the client API.
    #[serde(default)]
    pub url: Option<String>,
    pub as_token: String,
    pub hs_token: String,
    pub sender_localpart: String,
    #[serde(default)]
    pub namespaces: Namespaces,
    /// `false` exempts the appservice's users from rate limits (default: limited).
    #[serde(default)]
    pub rate_limited: Option<bool>,
    /// Third-party protocols the appservice bridges (`/thirdparty/...`).
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    /// Send typing, receipts and presence in transactions (MSC2409).
    #[serde(default)]
    pub receive_ephemeral: bool,
    /// The unstable name of `receive_ephemeral` (mautrix bridges write this one).
    #[serde(
        default,
        rename = "de.sorunome.msc2409.push_ephemeral",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub push_ephemeral_unstable: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Namespaces {
    #[serde(default)]
    pub users: Vec<Namespace>,
    #[serde(default)]
    pub aliases: Vec<Namespace>,
    #[serde(default)]
    pub rooms: Vec<Namespace>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Namespace {
    #[serde(default)]
    pub exclusive: bool,
    pub regex: String,
}

/// Most namespaces per kind, and the longest regex: a registration is operator input, but one
/// pasted by mistake should not make every event check slow.
const MAX_NAMESPACES: usize = 100;
const MAX_REGEX_LEN: usize = 1000;
const MAX_TOKEN_LEN: usize = 1024;

/// A namespace ready to test ids against.
#[derive(Debug)]
pub struct Compiled {
    pub exclusive: bool,
    pub regex: Regex,
}

/// The three kinds of namespaces, compiled.
#[derive(Debug, Default)]
pub struct CompiledNamespaces {
    pub users: Vec<Compiled>,
    pub aliases: Vec<Compiled>,
    pub rooms: Vec<Compiled>,
}

impl CompiledNamespaces {
    pub fn matches(list: &[Compiled], id: &str) -> bool {
        list.iter().any(|n| n.regex.is_match(id))
    }
    pub fn matches_exclusive(list: &[Compiled], id: &str) -> bool {
        list.iter().any(|n| n.exclusive && n.regex.is_match(id))
    }
}

impl Registration {
    /// Parse a registration file's text (YAML; JSON is YAML too).
    pub fn from_yaml(text: &str) -> Result<Registration, String> {
        serde_norway::from_str(text).map_err(|e| e.to_string())
    }

    /// Whether transactions carry ephemeral events.
    pub fn wants_ephemeral(&self) -> bool {
        self.receive_ephemeral || self.push_ephemeral_unstable
    }

    /// Whether the appservice's users are rate limited.
    pub fn is_rate_limited(&self) -> bool {
        self.rate_limited.unwrap_or(true)
    }

    /// Check every field and compile the namespaces; the error names the field.
    pub fn validate(&self) -> Result<CompiledNamespaces, String> {
        if self.id.is_empty() || self.id.len() > 255 {
            return Err("field `id`: must be 1 to 255 characters".to_owned());
        }
        for (field, token) in [("as_token", &self.as_token), ("hs_token", &self.hs_token)] {
            if token.is_empty() || token.len() > MAX_TOKEN_LEN {
                return Err(format!(
                    "field `{field}`: must be 1 to {MAX_TOKEN_LEN} characters"
                ));
            }
            if token.chars().any(char::is_whitespace) {
                return Err(format!("field `{field}`: must not contain whitespace"));
            }
        }
        if self.as_token == self.hs_token {
            return Err("fields `as_token` and `hs_token` must differ".to_owned());
        }
        if self.sender_localpart.is_empty()
            || !self
                .sender_localpart
                .chars()
                .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/' | '+'))
        {
            return Err(
                "field `sender_localpart`: must be a valid user id localpart (a-z, 0-9, ._=-/+)"
                    .to_owned(),
            );
        }
        if let Some(url) = &self.url {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => return Err("field `url`: must be an http(s) URL or null".to_owned()),
            }
        }
        if let Some(protocols) = &self.protocols {
            if protocols.len() > MAX_NAMESPACES || protocols.iter().any(|p| p.is_empty()) {
                return Err("field `protocols`: at most 100 non-empty names".to_owned());
            }
        }
        Ok(CompiledNamespaces {
            users: compile("namespaces.users", &self.namespaces.users)?,
            aliases: compile("namespaces.aliases", &self.namespaces.aliases)?,
            rooms: compile("namespaces.rooms", &self.namespaces.rooms)?,
        })
    }
}

/// Compile one kind of namespace. Regexes match from the start of the id (as Synapse's do), so
/// `@irc_.*` covers `@irc_alice:example.org`.
fn compile(field: &str, list: &[Namespace]) -> Result<Vec<Compiled>, String> {
    if list.len() > MAX_NAMESPACES {
        return Err(format!("field `{field}`: at most {MAX_NAMESPACES} entries"));
    }
    list.iter()
        .enumerate()
        .map(|(i, n)| {
            if n.regex.len() > MAX_REGEX_LEN {
                return Err(format!(
                    "field `{field}[{i}].regex`: longer than {MAX_REGEX_LEN} characters"
                ));
            }
            let regex = RegexBuilder::new(&format!("^(?:{})", n.regex))
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("field `{field}[{i}].regex`: {e}"))?;
            Ok(Compiled {
                exclusive: n.exclusive,
                regex,
            })
        })
        .collect()
}
