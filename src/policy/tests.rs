use serde_json::json;

use super::*;

const EXAMPLE: &str = r#"
permit(principal in Portcullis::Group::"eng", action == Portcullis::Action::"call_tool", resource)
when { resource.server == "github" && resource.name == "create_issue" && context.args.repo like "acme/*" };
"#;

fn engine(text: &str) -> Engine {
    Engine::load(&[("test.cedar".to_owned(), text.to_owned())], 0).unwrap_or_else(|e| panic!("{e}"))
}

fn user(name: &str, groups: &[&str]) -> Principal {
    Principal {
        id: format!("id-{name}"),
        name: name.to_owned(),
        kind: PrincipalKind::User,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        token_id: None,
        servers: None,
    }
}

fn call<'a>(p: &'a Principal, server: &'a str, tool: &'a str, args: &'a Value, servers: &'a [String]) -> Ask<'a> {
    Ask {
        principal: p,
        server,
        trusted: false,
        act: Act::CallTool { name: tool, args: Args::Known(Some(args)), annotations: None },
        client: Some(("test", "1")),
        servers,
        now_ms: 1_765_000_000_000,
    }
}

#[test]
fn the_schema_parses() {
    schema().expect("the shipped schema");
}

#[test]
fn the_example_policy_works_as_written() {
    let e = engine(EXAMPLE);
    let servers = vec!["github".to_owned()];
    let (alice, bob) = (user("alice", &["eng"]), user("bob", &["sales"]));
    let good = json!({"repo": "acme/widgets", "title": "x"});
    let d = e.decide(&call(&alice, "github", "create_issue", &good, &servers));
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.policies, vec!["test.cedar:1".to_owned()]);
    assert!(!e.decide(&call(&bob, "github", "create_issue", &good, &servers)).allowed, "not in the group");
    let other = json!({"repo": "evil/widgets"});
    assert!(!e.decide(&call(&alice, "github", "create_issue", &other, &servers)).allowed, "the argument rule bites");
    assert!(!e.decide(&call(&alice, "github", "delete_repo", &good, &servers)).allowed, "default deny");
    // A missing argument is an evaluation error, which denies.
    let d = e.decide(&call(&alice, "github", "create_issue", &json!({}), &servers));
    assert!(!d.allowed && !d.errors.is_empty(), "{d:?}");
}

#[test]
fn a_forbid_wins_and_is_named() {
    let e = engine(&format!(
        "{EXAMPLE}\n@id(\"no-prod\")\nforbid(principal, action, resource) when {{ context has args && context.args has repo && context.args.repo == \"acme/prod\" }};"
    ));
    let servers = vec!["github".to_owned()];
    let alice = user("alice", &["eng"]);
    let d = e.decide(&call(&alice, "github", "create_issue", &json!({"repo": "acme/prod"}), &servers));
    assert!(!d.allowed);
    assert_eq!(d.policies, vec!["no-prod".to_owned()]);
}

#[test]
fn an_invalid_policy_is_refused_with_its_place() {
    let err = Engine::load(
        &[("bad.cedar".to_owned(), "permit(principal, action, resource) when { resource.nope };".to_owned())],
        0,
    )
    .expect_err("invalid");
    assert!(err.to_string().contains("bad.cedar:1"), "{err}");
    let err = Engine::load(&[("bad.cedar".to_owned(), "permit(principal action resource);".to_owned())], 0)
        .expect_err("syntax");
    assert!(err.to_string().contains("bad.cedar"), "{err}");
    let err = Engine::load(
        &[(
            "a.cedar".to_owned(),
            r#"permit(principal, action == Portcullis::Action::"call_tol", resource);"#.to_owned(),
        )],
        0,
    )
    .expect_err("a misspelt action");
    assert!(err.to_string().contains("call_tol"), "{err}");
}

#[test]
fn arguments_are_open_but_everything_else_is_checked() {
    // `context.args.x` is accepted whatever x is; `context.argz` is not.
    engine(
        r#"permit(principal, action == Portcullis::Action::"call_tool", resource) when { context.args.count > 3 };"#,
    );
    engine(
        r#"permit(principal, action == Portcullis::Action::"call_tool", resource) when { context.args["a b"] == "x" };"#,
    );
    let err = Engine::load(
        &[("a.cedar".to_owned(), r#"permit(principal, action == Portcullis::Action::"call_tool", resource) when { context.argz.count > 3 };"#.to_owned())],
        0,
    )
    .expect_err("an unknown context attribute");
    assert!(err.to_string().contains("argz"), "{err}");
}

#[test]
fn argument_types_convert_as_documented() {
    let e = engine(
        r#"permit(principal, action == Portcullis::Action::"call_tool", resource)
           when { context.args.n == 3 && context.args.f == decimal("1.5") && context.args.tags.contains("a") && !(context.args has gone) };"#,
    );
    let servers = vec!["s".to_owned()];
    let p = user("alice", &[]);
    let args = json!({"n": 3, "f": 1.5, "tags": ["a", "b"], "gone": null});
    let d = e.decide(&call(&p, "s", "t", &args, &servers));
    assert!(d.allowed, "{d:?}");
}

#[test]
fn a_listing_shows_a_tool_when_some_call_could_be_allowed() {
    let e = engine(EXAMPLE);
    let servers = vec!["github".to_owned()];
    let alice = user("alice", &["eng"]);
    let list = |tool: &'static str| Ask {
        principal: &alice,
        server: "github",
        trusted: false,
        act: Act::CallTool { name: tool, args: Args::Unknown, annotations: None },
        client: None,
        servers: &servers,
        now_ms: 0,
    };
    assert!(e.may_list(&list("create_issue")), "allowed for some repo");
    assert!(!e.may_list(&list("delete_repo")), "never allowed");
    let bob = user("bob", &[]);
    assert!(!e.may_list(&Ask { principal: &bob, ..list("create_issue") }));
}

#[test]
fn annotations_count_only_for_trusted_servers() {
    let e = engine(
        r#"permit(principal, action == Portcullis::Action::"call_tool", resource)
           when { resource.annotations has readOnlyHint && resource.annotations.readOnlyHint };"#,
    );
    let servers = vec!["s".to_owned()];
    let p = user("alice", &[]);
    let ro = json!({"readOnlyHint": true});
    let args = json!({});
    let ask = |trusted| Ask {
        trusted,
        act: Act::CallTool { name: "t", args: Args::Known(Some(&args)), annotations: Some(&ro) },
        ..call(&p, "s", "t", &args, &servers)
    };
    assert!(e.decide(&ask(true)).allowed);
    assert!(!e.decide(&ask(false)).allowed, "an untrusted server's hints are not believed");
}

#[test]
fn the_time_is_in_the_context() {
    // 2026-12-07 is a Monday; 1_796_601_600_000 is 2026-12-07T00:00:00Z.
    let e = engine(
        r#"permit(principal, action == Portcullis::Action::"call_tool", resource)
           when { context.time.weekday <= 5 && context.time.hour >= 9 && context.time.hour < 17 };"#,
    );
    let servers = vec!["s".to_owned()];
    let p = user("alice", &[]);
    let args = json!({});
    let at = |ms| Ask { now_ms: ms, ..call(&p, "s", "t", &args, &servers) };
    assert!(e.decide(&at(1_796_601_600_000 + 10 * 3_600_000)).allowed, "Monday 10:00");
    assert!(!e.decide(&at(1_796_601_600_000 + 20 * 3_600_000)).allowed, "Monday 20:00");
    assert!(!e.decide(&at(1_796_601_600_000 - 14 * 3_600_000)).allowed, "Sunday 10:00");
}

#[test]
fn partitioned_decisions_equal_those_of_the_whole_set() {
    // Policies bound to servers and tools, and unbound ones; every request decided with the
    // partition and with the whole set must agree.
    let mut text = String::new();
    for s in 0..5 {
        for t in 0..4 {
            text.push_str(&format!(
                "permit(principal, action == Portcullis::Action::\"call_tool\", resource) when {{ resource.server == \"s{s}\" && resource.name == \"t{t}\" && context.args.n == {t} }};\n"
            ));
        }
        text.push_str(&format!(
            "forbid(principal in Portcullis::Group::\"g{s}\", action, resource in Portcullis::Server::\"s{s}\");\n"
        ));
    }
    text.push_str(
        "permit(principal, action == Portcullis::Action::\"call_tool\", resource) when { context.args has any };\n",
    );
    let e = engine(&text);
    let mut whole = PolicySet::new();
    for set in e.items.values().flat_map(HashMap::values) {
        for p in set.policies() {
            let _ = whole.add(p.clone());
        }
    }
    for p in e.any.policies() {
        let _ = whole.add(p.clone());
    }
    for set in e.servers.values() {
        for p in set.policies() {
            let _ = whole.add(p.clone());
        }
    }
    assert_eq!(whole.policies().count(), e.count + 2, "the folder's and the two of the baseline");
    let servers: Vec<String> = (0..6).map(|s| format!("s{s}")).collect();
    for s in 0..6 {
        for t in 0..5 {
            for n in 0..5 {
                for g in [vec![], vec!["g1"], vec![format!("g{s}").leak() as &str]] {
                    let p = user("u", &g);
                    let args = if n == 4 { json!({"any": 1}) } else { json!({"n": n}) };
                    let (server, tool) = (format!("s{s}"), format!("t{t}"));
                    let ask = call(&p, &server, &tool, &args, &servers);
                    let (request, entities) = e.request(&ask, false).expect("request");
                    let full = Authorizer::new().is_authorized(&request, &whole, &entities);
                    let full_allowed = full.decision() == cedar_policy::Decision::Allow
                        && full.diagnostics().errors().next().is_none();
                    assert_eq!(e.decide(&ask).allowed, full_allowed, "{server}/{tool} n={n} groups={g:?}");
                }
            }
        }
    }
}

#[test]
fn the_validator_message_for_arguments_is_the_one_tolerated() {
    // `is_argument_access` reads Cedar's message; if a new Cedar words it otherwise, this
    // fails (and policies reading arguments would be refused: closed, not open).
    let set = PolicySet::from_str(
        r#"permit(principal, action == Portcullis::Action::"call_tool", resource) when { context.args.repo == "x" };"#,
    )
    .expect("parses");
    let result = Validator::new(schema().expect("schema")).validate(&set, ValidationMode::Strict);
    let errors: Vec<_> = result.validation_errors().collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(is_argument_access(errors[0]), "{}", errors[0]);
}

/// A call at a trusted server, at `at`.
fn trusted_call<'a>(
    p: &'a Principal,
    (server, tool): (&'a str, &'a str),
    args: &'a Value,
    annotations: Option<&'a Value>,
    servers: &'a [String],
    at: i64,
) -> Ask<'a> {
    Ask {
        principal: p,
        server,
        trusted: true,
        act: Act::CallTool { name: tool, args: Args::Known(Some(args)), annotations },
        client: None,
        servers,
        now_ms: at,
    }
}

#[test]
fn the_shipped_examples_load_and_decide_as_their_comments_say() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples");
    let e = Engine::load_dir(&dir, 0).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(e.count, 5);
    let servers = vec!["github".to_owned(), "docs".to_owned()];
    // 2026-12-07 is a Monday; 1_796_601_600_000 is 2026-12-07T00:00:00Z.
    let monday_10 = 1_796_601_600_000 + 10 * 3_600_000;
    let saturday_10 = monday_10 + 5 * 24 * 3_600_000;
    let eng = user("alice", &["eng"]);
    let maint = user("max", &["maintainers"]);
    let bot = Principal { kind: PrincipalKind::Service, ..user("ci-bot", &["maintainers"]) };
    let (none, ro, destructive) = (json!({}), json!({"readOnlyHint": true}), json!({"destructiveHint": true}));
    let (acme, other) = (json!({"repo": "acme/widgets"}), json!({"repo": "other/widgets"}));
    let allowed = |ask: Ask<'_>| e.decide(&ask).allowed;
    let docs = ("docs", "search");
    assert!(allowed(trusted_call(&eng, docs, &none, Some(&ro), &servers, monday_10)), "read-only for everyone");
    assert!(!allowed(trusted_call(&eng, docs, &none, None, &servers, monday_10)), "no hint, no permit");
    assert!(!allowed(trusted_call(&eng, docs, &none, Some(&ro), &servers, saturday_10)), "working hours only");
    let issue = ("github", "create_issue");
    assert!(allowed(trusted_call(&eng, issue, &acme, None, &servers, monday_10)), "repo restricted: acme");
    assert!(!allowed(trusted_call(&eng, issue, &other, None, &servers, monday_10)), "repo restricted: other");
    let delete = ("github", "delete_repo");
    assert!(
        allowed(trusted_call(&maint, delete, &none, Some(&destructive), &servers, monday_10)),
        "writes for maintainers"
    );
    assert!(
        !allowed(trusted_call(&bot, delete, &none, Some(&destructive), &servers, monday_10)),
        "no destructive tools for service accounts"
    );
}

#[test]
fn context_attributes_are_built_when_a_policy_reads_them() {
    let e = engine(
        r#"permit(principal, action == Portcullis::Action::"call_tool", resource) when { context.servers.contains("jira") };"#,
    );
    let p = user("alice", &[]);
    let args = json!({});
    let with = vec!["jira".to_owned(), "s".to_owned()];
    let without = vec!["s".to_owned()];
    assert!(e.decide(&call(&p, "s", "t", &args, &with)).allowed);
    assert!(!e.decide(&call(&p, "s", "t", &args, &without)).allowed);
    // A policy that uses `context` whole gets every attribute.
    let e = engine(
        r#"permit(principal, action == Portcullis::Action::"call_tool", resource) when { context has servers && context.servers.contains("jira") };"#,
    );
    assert!(e.decide(&call(&p, "s", "t", &args, &with)).allowed);
}
