//! `WWW-Authenticate` parsing (R76, RFC 9110 §11.6.1, RFC 6750 §3): several challenges in one
//! header or several headers, case-insensitive scheme and parameter names, quoted strings with
//! escapes and commas, and `token68`.

/// One challenge: its scheme and parameters (names lower-cased, values unquoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The auth scheme, lower-cased (`bearer`).
    pub scheme: String,
    /// `name=value` parameters in order.
    pub params: Vec<(String, String)>,
    /// A `token68` instead of parameters.
    pub token68: Option<String>,
}

impl Challenge {
    /// The value of parameter `name` (lower-case).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// What a `Bearer` challenge from an upstream says (RFC 6750 §3, RFC 9728 §5.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BearerChallenge {
    /// `error` (`invalid_token`, `insufficient_scope`, …).
    pub error: Option<String>,
    /// `scope`: the scopes the resource wants, space-separated.
    pub scope: Option<String>,
    /// `resource_metadata`: where the protected resource metadata is.
    pub resource_metadata: Option<String>,
}

impl BearerChallenge {
    /// The first `Bearer` challenge among all `WWW-Authenticate` values of `headers`.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<BearerChallenge> {
        headers
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse)
            .find(|c| c.scheme == "bearer")
            .map(|c| BearerChallenge {
                error: c.param("error").map(str::to_owned),
                scope: c.param("scope").map(str::to_owned).filter(|s| !s.trim().is_empty()),
                resource_metadata: c.param("resource_metadata").map(str::to_owned),
            })
    }

    /// The scopes of `scope`, split on spaces.
    pub fn scopes(&self) -> Vec<String> {
        self.scope.as_deref().map(split_scopes).unwrap_or_default()
    }
}

/// `"a b  c"` as `["a", "b", "c"]`.
pub fn split_scopes(text: &str) -> Vec<String> {
    text.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Every challenge in one header value. Malformed parts end the parse; what was read before
/// them is kept.
pub fn parse(value: &str) -> Vec<Challenge> {
    let mut p = Parser { s: value.as_bytes(), i: 0 };
    let mut out: Vec<Challenge> = Vec::new();
    loop {
        p.skip_separators();
        let Some(scheme) = p.token() else { break };
        let mut challenge = Challenge { scheme: scheme.to_ascii_lowercase(), params: Vec::new(), token68: None };
        p.skip_ws();
        // Parameters (or one token68) until the next scheme.
        loop {
            let save = p.i;
            p.skip_ws();
            let Some(name) = p.token68_or_token() else {
                p.i = save;
                break;
            };
            p.skip_ws();
            if p.peek() == Some(b'=') && !is_token68_tail(&name, p.rest()) {
                p.i += 1;
                p.skip_ws();
                let value = if p.peek() == Some(b'"') { p.quoted() } else { p.token() };
                let Some(value) = value else {
                    out.push(challenge);
                    return out;
                };
                challenge.params.push((name.to_ascii_lowercase(), value));
                p.skip_ws();
                if p.peek() == Some(b',') {
                    p.i += 1;
                    // A following `name=` continues this challenge; a bare token starts the next.
                    let save = p.i;
                    p.skip_separators();
                    let next_is_param = p.token().is_some() && {
                        p.skip_ws();
                        p.peek() == Some(b'=')
                    };
                    p.i = save;
                    if !next_is_param {
                        break;
                    }
                }
            } else if challenge.params.is_empty() && challenge.token68.is_none() && p.i > save {
                // `name` followed by optional `=` padding and no value: a token68.
                let mut t = name;
                while p.peek() == Some(b'=') {
                    t.push('=');
                    p.i += 1;
                }
                challenge.token68 = Some(t);
                p.skip_ws();
                if p.peek() == Some(b',') {
                    p.i += 1;
                }
                break;
            } else {
                p.i = save;
                break;
            }
        }
        out.push(challenge);
    }
    out
}

/// Whether `=` after `name` is token68 padding rather than a parameter's `=` (`abc==`, or
/// `abc=` at the end or before a comma).
fn is_token68_tail(_name: &str, rest: &[u8]) -> bool {
    let eqs = rest.iter().take_while(|b| **b == b'=').count();
    let after = rest[eqs..].iter().find(|b| !matches!(b, b' ' | b'\t'));
    eqs > 1 || matches!(after, None | Some(b','))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn rest(&self) -> &[u8] {
        &self.s[self.i..]
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn skip_separators(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.i += 1;
        }
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn token(&mut self) -> Option<String> {
        self.take_while(is_tchar)
    }

    fn token68_or_token(&mut self) -> Option<String> {
        self.take_while(|b| is_tchar(b) || b == b'/')
    }

    fn quoted(&mut self) -> Option<String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(String::from_utf8_lossy(&out).into_owned());
                }
                b'\\' => {
                    self.i += 1;
                    out.push(self.peek()?);
                    self.i += 1;
                }
                b => {
                    out.push(b);
                    self.i += 1;
                }
            }
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parameters_are_read_whatever_their_case_and_quoting() {
        let c = parse(
            r#"Bearer realm="mcp", ERROR="insufficient_scope", scope="a b", resource_metadata="https://x/.well-known/oauth-protected-resource/mcp""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("error"), Some("insufficient_scope"));
        assert_eq!(c[0].param("scope"), Some("a b"));
        assert_eq!(c[0].param("resource_metadata"), Some("https://x/.well-known/oauth-protected-resource/mcp"));
    }

    #[test]
    fn several_challenges_commas_in_quotes_escapes_and_token68() {
        let c = parse(r#"Basic realm="a, b", Bearer error=invalid_token, scope="x \"y\"", Negotiate abc123=="#);
        let schemes: Vec<_> = c.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["basic", "bearer", "negotiate"]);
        assert_eq!(c[0].param("realm"), Some("a, b"));
        assert_eq!(c[1].param("error"), Some("invalid_token"));
        assert_eq!(c[1].param("scope"), Some(r#"x "y""#));
        assert_eq!(c[2].token68.as_deref(), Some("abc123=="));
    }

    #[test]
    fn bare_scheme_and_garbage_do_not_panic() {
        assert_eq!(parse("Bearer")[0].scheme, "bearer");
        assert!(parse("").is_empty());
        for junk in ["Bearer scope=\"open", "=", ",,,", "Bearer a=b=c", "Bearer \"x\""] {
            let _ = parse(junk);
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::{BearerChallenge, Challenge, parse};

        /// A token (RFC 9110 §5.6.2), as schemes and parameter names are written.
        fn token() -> impl Strategy<Value = String> {
            "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,12}"
        }

        /// A challenge: a scheme with either parameters (values of any visible ASCII, spaces
        /// and tabs included, quoted when rendered) or one token68 (RFC 9110 §11.2).
        fn challenge() -> impl Strategy<Value = Challenge> {
            let params = proptest::collection::vec((token(), "[ -~\t]{0,24}"), 0..5);
            let token68 = "[A-Za-z0-9._~+/-]{1,40}={0,2}";
            (token(), prop_oneof![params.prop_map(|p| (p, None)), token68.prop_map(|t| (Vec::new(), Some(t)))])
                .prop_map(|(scheme, (params, token68))| Challenge {
                    scheme: scheme.to_ascii_lowercase(),
                    params: params.into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect(),
                    token68,
                })
        }

        /// How a server might write `challenges` in one header: any case for names, quoted
        /// values with `\` escapes, optional whitespace around `=` and after commas.
        fn render(challenges: &[Challenge], upper: bool, ws: &str) -> String {
            let case = |s: &str| if upper { s.to_ascii_uppercase() } else { s.to_owned() };
            let mut out = Vec::new();
            for c in challenges {
                let mut text = case(&c.scheme);
                if let Some(t) = &c.token68 {
                    text.push(' ');
                    text.push_str(t);
                } else if !c.params.is_empty() {
                    let params: Vec<String> = c
                        .params
                        .iter()
                        .map(|(n, v)| {
                            let quoted = v.replace('\\', "\\\\").replace('"', "\\\"");
                            format!("{}{ws}={ws}\"{quoted}\"", case(n))
                        })
                        .collect();
                    text.push(' ');
                    text.push_str(&params.join(&format!(",{ws}")));
                }
                out.push(text);
            }
            out.join(&format!(",{ws}"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn www_authenticate_parse_never_panics(text in any::<String>(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = parse(&text);
                let _ = parse(&String::from_utf8_lossy(&bytes));
                if let Ok(v) = http::HeaderValue::from_bytes(&bytes) {
                    let mut h = http::HeaderMap::new();
                    h.append(http::header::WWW_AUTHENTICATE, v);
                    let _ = BearerChallenge::from_headers(&h);
                }
            }

            #[test]
            fn www_authenticate_round_trips(
                challenges in proptest::collection::vec(challenge(), 0..4),
                upper in any::<bool>(),
                ws in prop_oneof![Just(""), Just(" "), Just(" \t ")],
            ) {
                let text = render(&challenges, upper, ws);
                prop_assert_eq!(parse(&text), challenges, "{}", text);
            }

            #[test]
            fn a_bearer_challenge_is_read_back_from_headers(
                error in "[a-z_]{1,20}",
                scopes in proptest::collection::vec("[a-z:.]{1,10}", 1..4),
                metadata in "https://[a-z]{1,10}\\.example/[ -~]{0,20}",
                before in proptest::collection::vec(challenge(), 0..2),
            ) {
                let bearer = Challenge {
                    scheme: "bearer".into(),
                    params: vec![
                        ("error".into(), error.clone()),
                        ("scope".into(), scopes.join(" ")),
                        ("resource_metadata".into(), metadata.clone()),
                    ],
                    token68: None,
                };
                let before: Vec<Challenge> = before.into_iter().filter(|c| c.scheme != "bearer").collect();
                let mut h = http::HeaderMap::new();
                if !before.is_empty() {
                    h.append(http::header::WWW_AUTHENTICATE, render(&before, false, " ").parse().expect("visible ASCII"));
                }
                h.append(http::header::WWW_AUTHENTICATE, render(&[bearer], true, " ").parse().expect("visible ASCII"));
                let b = BearerChallenge::from_headers(&h).expect("found");
                prop_assert_eq!(b.scopes(), scopes);
                prop_assert_eq!(b.error, Some(error));
                prop_assert_eq!(b.resource_metadata, Some(metadata));
            }
        }
    }

    #[test]
    fn the_bearer_challenge_is_found_among_several_headers() {
        let mut h = http::HeaderMap::new();
        h.append(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Basic realm=x"));
        h.append(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(r#"bearer scope="", resource_metadata="https://r/prm""#),
        );
        let b = BearerChallenge::from_headers(&h).expect("bearer");
        assert_eq!(b.scope, None);
        assert_eq!(b.resource_metadata.as_deref(), Some("https://r/prm"));
    }
}
