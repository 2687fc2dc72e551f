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

/// Property tests: any registration text is read without panic (YAML bombs and deep nesting
/// included), what validates keeps the bounds, and a registration reads back as written, in
/// YAML and in JSON.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, edit_text, edits, text};

    fn namespace() -> impl Strategy<Value = Namespace> {
        (
            any::<bool>(),
            prop_oneof![text(), "@[a-z_]{1,8}\\.\\*".prop_map(|r| r.to_owned())],
        )
            .prop_map(|(exclusive, regex)| Namespace { exclusive, regex })
    }

    fn registration() -> impl Strategy<Value = Registration> {
        let namespaces = (
            prop::collection::vec(namespace(), 0..4),
            prop::collection::vec(namespace(), 0..3),
            prop::collection::vec(namespace(), 0..3),
        )
            .prop_map(|(users, aliases, rooms)| Namespaces {
                users,
                aliases,
                rooms,
            });
        (
            (
                text(),
                prop::option::of(prop_oneof![
                    text(),
                    "https?://[a-z.]{1,12}(:[0-9]{1,5})?/?".prop_map(|u| u.to_owned())
                ]),
            ),
            (text(), text(), text()),
            namespaces,
            (
                prop::option::of(any::<bool>()),
                prop::option::of(prop::collection::vec(text(), 0..3)),
            ),
            (any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (id, url),
                    (as_token, hs_token, sender_localpart),
                    namespaces,
                    (rate_limited, protocols),
                    (receive_ephemeral, push_ephemeral_unstable),
                )| {
                    Registration {
                        id,
                        url,
                        as_token,
                        hs_token,
                        sender_localpart,
                        namespaces,
                        rate_limited,
                        protocols,
                        receive_ephemeral,
                        push_ephemeral_unstable,
                    }
                },
            )
    }

    const VALID: &str = "id: bridge\nurl: http://localhost:29318\nas_token: a1\nhs_token: h1\nsender_localpart: bot\nnamespaces:\n  users:\n    - exclusive: true\n      regex: '@irc_.*'\n  aliases: []\nrate_limited: false\nde.sorunome.msc2409.push_ephemeral: true\n";

    /// A "billion laughs": each level repeats the previous one ten times.
    fn bomb(levels: usize, field: &str) -> String {
        let mut doc = "l0: &l0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n".to_owned();
        for i in 1..levels {
            let p = i - 1;
            doc.push_str(&format!(
                "l{i}: &l{i} [*l{p},*l{p},*l{p},*l{p},*l{p},*l{p},*l{p},*l{p},*l{p},*l{p}]\n"
            ));
        }
        format!("{doc}{field}: *l{}\n{VALID}", levels - 1)
    }

    fn read(text: &str) -> Result<(), TestCaseError> {
        let Ok(reg) = Registration::from_yaml(text) else {
            return Ok(());
        };
        if reg.validate().is_ok() {
            prop_assert!(!reg.id.is_empty() && reg.id.len() <= 255);
            for token in [&reg.as_token, &reg.hs_token] {
                prop_assert!(!token.is_empty() && token.len() <= MAX_TOKEN_LEN);
                prop_assert!(!token.chars().any(char::is_whitespace));
            }
            for list in [
                &reg.namespaces.users,
                &reg.namespaces.aliases,
                &reg.namespaces.rooms,
            ] {
                prop_assert!(list.len() <= MAX_NAMESPACES);
                prop_assert!(list.iter().all(|n| n.regex.len() <= MAX_REGEX_LEN));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_any_text_reads_without_panic(text in prop_oneof![
            text(),
            edits().prop_map(|e| edit_text(VALID, &e)),
            (1usize..300).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
            (1usize..300).prop_map(|d| format!("id: {}x", "- ".repeat(d))),
        ]) {
            read(&text)?;
        }

        #[test]
        fn fuzz_registrations_read_back_as_written(reg in registration()) {
            let yaml = serde_norway::to_string(&reg).expect("serializes");
            let back = Registration::from_yaml(&yaml);
            prop_assert_eq!(back.as_ref(), Ok(&reg), "{}", yaml);
            let json = serde_json::to_string(&reg).expect("serializes");
            let back = Registration::from_yaml(&json);
            prop_assert_eq!(back.as_ref(), Ok(&reg), "{}", json);
            // Checking never panics, and what passes is within the bounds.
            read(&yaml)?;
        }
    }

    #[test]
    fn fuzz_yaml_bombs_are_refused_quickly() {
        // In a field that is kept the bomb is refused; in one that is ignored it is never
        // expanded. Either way, quickly.
        for (field, refused) in [
            ("protocols", true),
            ("namespaces", true),
            ("unknown_field", false),
        ] {
            let started = std::time::Instant::now();
            assert_eq!(
                Registration::from_yaml(&bomb(9, field)).is_err(),
                refused,
                "{field}"
            );
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{field}"
            );
        }
        assert!(Registration::from_yaml(VALID)
            .expect("valid")
            .validate()
            .is_ok());
    }
}
