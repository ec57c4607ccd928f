//! Which requests a policy can apply to, read from its text: Cedar evaluates every policy of
//! the set it is given (about 0.3–0.75 µs each), so a decision is made with only the
//! policies that could apply to its server and tool.
//!
//! A policy is bound to server `s` when its resource scope is `Portcullis::Server::"s"`
//! (`==` or `in`) or an item of it (`Portcullis::Tool::"s/…"` and the like), or when its
//! `when` clause begins by requiring `resource.server == "s"`.
//! It is bound to tool (or prompt) `t` of `s` when it is also bound to `s` and its scope is
//! `Portcullis::Tool::"s/t"` or a `when` clause requires `resource.name == "t"`. Only the
//! tests a policy evaluates first count: its scope, and the leading tests of its first
//! condition when that is a `when` (`resource.server == "s" && resource.name == "t" && …`).
//! For any other server or name such a policy stops at a false test before it reaches
//! anything that could fail (validation guarantees the attributes exist), so it can be
//! neither satisfied nor in error there, and leaving it out of those decisions changes none
//! of them. Every other policy is in every decision.

use serde_json::Value;

/// Where a policy belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// Any server.
    Any,
    /// One server, any item.
    Server(String),
    /// One named item (tool or prompt) of one server.
    Item(String, String),
}

/// The key of a policy, from its JSON form (Cedar's EST).
pub fn key(policy: &Value) -> Key {
    let (mut server, mut name) = (None, None);
    let op = policy.pointer("/resource/op").and_then(Value::as_str);
    if let Some(entity) = policy.pointer("/resource/entity")
        && matches!(op, Some("==" | "in"))
    {
        let (ty, id) = (entity["type"].as_str().unwrap_or_default(), entity["id"].as_str().unwrap_or_default());
        match ty {
            "Portcullis::Server" => server = Some(id.to_owned()),
            "Portcullis::Tool" | "Portcullis::Prompt" | "Portcullis::Resource" => {
                if let Some((s, item)) = id.split_once('/') {
                    server = Some(s.to_owned());
                    if ty != "Portcullis::Resource" && op == Some("==") {
                        name = Some(item.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(first) = policy["conditions"].as_array().and_then(|c| c.first())
        && first["kind"] == "when"
    {
        leading(&first["body"], &mut |attr, literal| match attr {
            "server" if server.is_none() => server = Some(literal.to_owned()),
            "name" if name.is_none() => name = Some(literal.to_owned()),
            _ => {}
        });
    }
    match (server, name) {
        (Some(s), Some(n)) => Key::Item(s, n),
        (Some(s), None) => Key::Server(s),
        (None, _) => Key::Any,
    }
}

/// Calls `found(attr, literal)` for each `resource.attr == "literal"` test at the start of
/// the `&&` chain `expr`, in evaluation order (left first), up to the first other test;
/// returns whether every test of `expr` was one.
fn leading(expr: &Value, found: &mut impl FnMut(&str, &str)) -> bool {
    if let Some(and) = expr.get("&&") {
        return leading(&and["left"], found) && leading(&and["right"], found);
    }
    let Some(eq) = expr.get("==") else { return false };
    for (a, b) in [(&eq["left"], &eq["right"]), (&eq["right"], &eq["left"])] {
        let Some(get) = a.get(".") else { continue };
        let on_resource =
            get["left"].get("Var").and_then(Value::as_str).is_some_and(|v| v.eq_ignore_ascii_case("resource"));
        if let (true, Some(attr), Some(literal)) =
            (on_resource, get["attr"].as_str(), b.get("Value").and_then(Value::as_str))
        {
            found(attr, literal);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(text: &str) -> Key {
        let policy = cedar_policy::Policy::parse(None, text).expect("parses");
        key(&policy.to_json().expect("json"))
    }

    #[test]
    fn policies_are_bound_by_their_scope_or_their_required_tests() {
        assert_eq!(
            key_of(
                r#"permit(principal in Portcullis::Group::"eng", action == Portcullis::Action::"call_tool", resource)
                   when { resource.server == "github" && resource.name == "create_issue" && context.args.repo like "acme/*" };"#
            ),
            Key::Item("github".into(), "create_issue".into())
        );
        assert_eq!(
            key_of(r#"permit(principal, action, resource == Portcullis::Tool::"jira/search");"#),
            Key::Item("jira".into(), "search".into())
        );
        assert_eq!(
            key_of(r#"permit(principal, action, resource in Portcullis::Server::"jira");"#),
            Key::Server("jira".into())
        );
        assert_eq!(
            key_of(r#"forbid(principal, action, resource) when { "slack" == resource.server };"#),
            Key::Server("slack".into())
        );
    }

    #[test]
    fn a_test_that_is_not_required_binds_nothing() {
        assert_eq!(
            key_of(r#"permit(principal, action, resource) when { resource.server == "a" || resource.server == "b" };"#),
            Key::Any
        );
        assert_eq!(key_of(r#"permit(principal, action, resource) unless { resource.server == "a" };"#), Key::Any);
        assert_eq!(key_of(r#"permit(principal, action, resource) when { !(resource.server == "a") };"#), Key::Any);
        assert_eq!(key_of(r#"permit(principal, action, resource) when { context.server == "a" };"#), Key::Any);
        assert_eq!(
            key_of(r#"permit(principal, action, resource) when { context.args.x == 1 && resource.server == "a" };"#),
            Key::Any,
            "a test after one that may fail on another server binds nothing"
        );
        assert_eq!(
            key_of(r#"permit(principal, action, resource) when { resource.name == "x" };"#),
            Key::Any,
            "a name without a server binds nothing"
        );
    }
}
