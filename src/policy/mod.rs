//! Policy: which tools, prompts and resources a caller may use, decided in Cedar for every
//! client message by the dispatch (`mcp::dispatch`), and the same decisions filtering what
//! listings show. See `docs/policy.md`.
//!
//! - [`Policies`] is what the gateway holds: the built-in rule when `[policy]` is not
//!   configured (every authenticated caller may use everything its token allows), or the
//!   Cedar policies of `[policy] dir`, reloaded when the folder changes.
//! - [`Engine`] is one loaded set: validated against the schema shipped with the gateway
//!   ([`SCHEMA`]), split by server and tool ([`partition`]) so that a decision evaluates only
//!   the policies that could apply to it.
//! - [`Ask`] is one question; [`Decision`] its answer with the policies that made it. Any
//!   error while deciding denies.

mod input;
pub mod partition;
mod reload;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde_json::Value;

use crate::authn::{Principal, PrincipalKind};
pub use reload::watch;

/// The Cedar schema every policy is validated against (`docs/policy.md` shows it).
pub const SCHEMA: &str = include_str!("schema.cedarschema");

/// What a loaded policy folder could not be used for.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The folder or a file in it could not be read.
    #[error("cannot read the policies in {path}: {why}")]
    Read {
        /// The folder or file.
        path: String,
        /// Why.
        why: String,
    },
    /// Policies that do not parse or do not validate against the schema: one line each.
    #[error("invalid policies:\n{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// What a decision is about.
#[derive(Debug, Clone, Copy)]
pub enum Act<'a> {
    /// Opening a session with the server, and the messages that touch no tool, prompt or
    /// resource.
    Connect,
    /// Listing the server's tools at all.
    ListTools,
    /// Running a tool.
    CallTool {
        /// The tool's name.
        name: &'a str,
        /// Its arguments.
        args: Args<'a>,
        /// The tool's annotations as the server lists them, if known (believed only for a
        /// trusted server).
        annotations: Option<&'a Value>,
    },
    /// Getting a prompt.
    GetPrompt {
        /// The prompt's name.
        name: &'a str,
        /// Its arguments.
        args: Args<'a>,
    },
    /// Reading (or subscribing to) a resource.
    ReadResource {
        /// Its URI.
        uri: &'a str,
    },
}

impl Act<'_> {
    /// The Cedar action's id.
    pub fn action(&self) -> &'static str {
        match self {
            Act::Connect => "connect",
            Act::ListTools => "list_tools",
            Act::CallTool { .. } => "call_tool",
            Act::GetPrompt { .. } => "get_prompt",
            Act::ReadResource { .. } => "read_resource",
        }
    }
}

/// A call's arguments.
#[derive(Debug, Clone, Copy)]
pub enum Args<'a> {
    /// As sent (`None`: no `arguments` member).
    Known(Option<&'a Value>),
    /// Any: a listing asks whether some call could be allowed.
    Unknown,
}

/// One question: may this caller do this at this server now?
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// Who asks.
    pub principal: &'a Principal,
    /// The configured server.
    pub server: &'a str,
    /// Whether the server is trusted (`trusted = true`): only then are its tools'
    /// annotations believed.
    pub trusted: bool,
    /// What they ask to do.
    pub act: Act<'a>,
    /// The client program (`clientInfo` name and version), if known.
    pub client: Option<(&'a str, &'a str)>,
    /// The servers the caller's token may reach (every configured server when the token is
    /// not limited).
    pub servers: &'a [String],
    /// When, in Unix milliseconds.
    pub now_ms: i64,
}

/// A decision and what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// The policies that determined it (for an allow, the permits that matched; for a
    /// deny, the forbids that matched, none when nothing permitted it); `builtin` for the
    /// built-in rule.
    pub policies: Vec<String>,
    /// Errors met while deciding (each denies): the policy and the error.
    pub errors: Vec<String>,
}

impl Decision {
    fn builtin() -> Decision {
        Decision { allowed: true, policies: vec![BUILTIN_ID.to_owned()], errors: Vec::new() }
    }
}

/// What the policy settings of `config` deserve a warning for: the built-in rule in force
/// (`check-config --strict` fails on it).
pub fn config_warnings(config: &crate::config::Config) -> Vec<String> {
    match config.policy {
        Some(_) => Vec::new(),
        None => vec![
            "no [policy] section: the built-in rule is in force, every authenticated caller may use every tool, \
             prompt and resource its grant token allows (set [policy] dir to a folder of Cedar policies; see docs/policy.md)"
                .to_owned(),
        ],
    }
}

/// Policies in force in every Cedar set, before the folder's: opening a session with a server
/// and listing its tools are allowed unless a `forbid` says otherwise. Neither reaches any
/// tool, prompt or resource, each of which stays denied until a policy permits it; without
/// them, a policy like the one in docs/policy.md would let nobody open a session at all.
pub const BASELINE: &str = r#"
@id("portcullis:connect")
permit(principal, action == Portcullis::Action::"connect", resource);
@id("portcullis:list_tools")
permit(principal, action == Portcullis::Action::"list_tools", resource);
"#;

/// The id the built-in rule's decisions name.
pub const BUILTIN_ID: &str = "builtin";

/// The policies in force.
#[derive(Debug, Clone)]
pub enum Policies {
    /// No `[policy]`: every authenticated caller may use everything its token allows.
    Builtin,
    /// The Cedar policies of `[policy] dir`.
    Cedar(Arc<Current>),
}

impl Policies {
    /// Decides `ask`.
    pub fn decide(&self, ask: &Ask<'_>) -> Decision {
        match self {
            Policies::Builtin => Decision::builtin(),
            Policies::Cedar(current) => current.get().decide(ask),
        }
    }

    /// Whether a listing shows this item: some call to it could be allowed (its arguments
    /// unknown).
    pub fn may_list(&self, ask: &Ask<'_>) -> bool {
        match self {
            Policies::Builtin => true,
            Policies::Cedar(current) => current.get().may_list(ask),
        }
    }

    /// A line for the start-up log and `/readyz`.
    pub fn describe(&self) -> String {
        match self {
            Policies::Builtin => {
                "built-in: every authenticated caller may use every tool, prompt and resource its token allows"
                    .to_owned()
            }
            Policies::Cedar(current) => {
                let engine = current.get();
                format!("cedar: {} policies from {}", engine.count, current.dir.display())
            }
        }
    }
}

/// The engine in force for one policy folder, replaced as a whole when the folder changes.
#[derive(Debug)]
pub struct Current {
    dir: PathBuf,
    offset_minutes: i32,
    engine: RwLock<Arc<Engine>>,
}

impl Current {
    /// Loads `dir`; fails when its policies cannot be used.
    pub fn load(dir: &Path, offset_minutes: i32) -> Result<Arc<Current>, PolicyError> {
        let engine = Engine::load_dir(dir, offset_minutes)?;
        Ok(Arc::new(Current { dir: dir.to_owned(), offset_minutes, engine: RwLock::new(Arc::new(engine)) }))
    }

    /// The engine in force.
    pub fn get(&self) -> Arc<Engine> {
        self.engine.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn replace(&self, engine: Engine) {
        *self.engine.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(engine);
    }
}

/// One validated policy set, split by where its policies apply.
pub struct Engine {
    /// Policies bound to no server.
    any: PolicySet,
    /// Per server: `any` and the policies bound to the server (and to none of its items).
    servers: HashMap<String, PolicySet>,
    /// Per (server, item name): the server's set and the policies bound to that item.
    /// Keyed by server, then item name, so that a decision looks its set up by `&str`
    /// without building a key.
    items: HashMap<String, HashMap<String, PolicySet>>,
    /// How many policies the folder holds (the [`BASELINE`] not counted).
    pub count: usize,
    /// The digest of the folder's files it was loaded from (to see changes).
    digest: [u8; 32],
    offset_minutes: i32,
    actions: HashMap<&'static str, EntityUid>,
    /// The context attributes some policy reads; `None`: all (a policy reads `context` as a
    /// whole). Building an attribute no policy reads would change no decision, and `servers`
    /// and `time` cost more than the authorization itself.
    context_uses: Option<HashSet<String>>,
    /// `context.time` of the last second asked about (built once per second).
    time: std::sync::Mutex<Option<(i64, RestrictedExpression)>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("count", &self.count).finish_non_exhaustive()
    }
}

/// The schema, parsed (it is part of the build, so a failure is a bug caught by the tests).
pub fn schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(schema, _)| schema)
        .map_err(|e| PolicyError::Invalid(vec![format!("the built-in schema: {e}")]))
}

/// The `.cedar` files of `dir`, sorted by name, with their text.
fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, PolicyError> {
    let err =
        |path: &Path, e: std::io::Error| PolicyError::Read { path: path.display().to_string(), why: e.to_string() };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
        let path = entry.map_err(|e| err(dir, e))?.path();
        if path.extension().is_some_and(|x| x == "cedar") && path.is_file() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let text = std::fs::read_to_string(&path).map_err(|e| err(&path, e))?;
            files.push((name, text));
        }
    }
    files.sort();
    Ok(files)
}

fn digest(files: &[(String, String)]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (name, text) in files {
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        h.update((text.len() as u64).to_be_bytes());
        h.update(text.as_bytes());
    }
    h.finalize().into()
}

/// The entity type names, parsed once: parsing a name runs Cedar's parser, which costs more
/// than the rest of a decision.
static TYPES: std::sync::LazyLock<HashMap<&'static str, EntityTypeName>> = std::sync::LazyLock::new(|| {
    [
        "Portcullis::Action",
        "Portcullis::Group",
        "Portcullis::User",
        "Portcullis::ServiceAccount",
        "Portcullis::Anonymous",
        "Portcullis::Server",
        "Portcullis::Tool",
        "Portcullis::Prompt",
        "Portcullis::Resource",
    ]
    .into_iter()
    .map(|ty| (ty, EntityTypeName::from_str(ty).unwrap_or_else(|_| unreachable_type())))
    .collect()
});

fn uid(ty: &str, id: &str) -> EntityUid {
    // The type names are this module's constants, all in `TYPES`.
    let ty = TYPES.get(ty).cloned().unwrap_or_else(unreachable_type);
    EntityUid::from_type_name_and_id(ty, EntityId::new(id))
}

#[expect(clippy::panic, reason = "the entity type names are constants of this module, checked by its tests")]
fn unreachable_type() -> EntityTypeName {
    panic!("an entity type name of the Portcullis schema does not parse")
}

/// Whether a validation error is an access to one of the call's arguments, which the schema
/// cannot know: `context.args` is open (see the schema). The message is Cedar's; a test pins it.
fn is_argument_access(error: &cedar_policy::ValidationError) -> bool {
    let text = error.to_string();
    matches!(error, cedar_policy::ValidationError::UnsafeAttributeAccess(_))
        && (text.contains("attribute `args.") || text.contains("attribute `args[\""))
        && text.contains(" in context for Portcullis::Action::")
}

impl Engine {
    /// Loads and validates the `.cedar` files of `dir`.
    pub fn load_dir(dir: &Path, offset_minutes: i32) -> Result<Engine, PolicyError> {
        let files = read_dir(dir)?;
        Engine::load(&files, offset_minutes)
    }

    /// Loads and validates policies from `(file name, text)` pairs. Each policy's id is its
    /// `@id("…")` annotation, or `file.cedar:N` (its place in the file, from 1).
    pub fn load(files: &[(String, String)], offset_minutes: i32) -> Result<Engine, PolicyError> {
        let schema = schema()?;
        let mut problems = Vec::new();
        let mut all = PolicySet::new();
        let baseline = [("portcullis:baseline".to_owned(), BASELINE.to_owned())];
        for (name, text) in baseline.iter().chain(files) {
            let set = match PolicySet::from_str(text) {
                Ok(set) => set,
                Err(e) => {
                    problems.push(format!("{name}: {e}"));
                    continue;
                }
            };
            if set.templates().next().is_some() {
                problems.push(format!("{name}: policy templates are not supported"));
            }
            // In file order: parse order is the order of the text.
            let mut policies: Vec<_> = set.policies().cloned().collect();
            policies.sort_by_key(|p| p.id().to_string().trim_start_matches("policy").parse::<usize>().unwrap_or(0));
            for (i, policy) in policies.into_iter().enumerate() {
                let id = policy.annotation("id").map_or_else(|| format!("{name}:{}", i + 1), str::to_owned);
                if id.starts_with("portcullis:") && !name.starts_with("portcullis:") {
                    problems
                        .push(format!("{name}: policy {id}: ids starting with `portcullis:` are the gateway's own"));
                    continue;
                }
                if let Err(e) = all.add(policy.new_id(PolicyId::new(&id))) {
                    problems.push(format!("{name}: policy {id}: {e}"));
                }
            }
        }
        let validation = Validator::new(schema).validate(&all, ValidationMode::Strict);
        for e in validation.validation_errors().filter(|e| !is_argument_access(e)) {
            problems.push(format!("policy {}: {e}", e.policy_id()));
        }
        if !problems.is_empty() {
            return Err(PolicyError::Invalid(problems));
        }
        let mut bound: BTreeMap<partition::Key, Vec<cedar_policy::Policy>> = BTreeMap::new();
        for policy in all.policies() {
            let key = policy.to_json().map(|j| partition::key(&j)).unwrap_or(partition::Key::Any);
            bound.entry(key).or_default().push(policy.clone());
        }
        let set_of = |parts: &[&[cedar_policy::Policy]]| {
            let mut set = PolicySet::new();
            for p in parts.iter().flat_map(|p| p.iter()) {
                // Ids are unique in `all`, so adding cannot fail.
                let _ = set.add(p.clone());
            }
            set
        };
        let none: &[cedar_policy::Policy] = &[];
        let any = bound.get(&partition::Key::Any).map_or(none, Vec::as_slice);
        let mut servers = HashMap::new();
        let mut items: HashMap<String, HashMap<String, PolicySet>> = HashMap::new();
        for (key, policies) in &bound {
            match key {
                partition::Key::Any => {}
                partition::Key::Server(s) => {
                    servers.insert(s.clone(), set_of(&[any, policies]));
                }
                partition::Key::Item(s, n) => {
                    let server = bound.get(&partition::Key::Server(s.clone())).map_or(none, Vec::as_slice);
                    items.entry(s.clone()).or_default().insert(n.clone(), set_of(&[any, server, policies]));
                }
            }
        }
        // A server bound only through its items still has a set of its own.
        for s in items.keys() {
            if !servers.contains_key(s) {
                servers.insert(s.clone(), set_of(&[any]));
            }
        }
        let actions = ["connect", "list_tools", "call_tool", "get_prompt", "read_resource"]
            .into_iter()
            .map(|a| (a, uid("Portcullis::Action", a)))
            .collect();
        let context_uses = all.policies().map(|p| p.to_json().ok().and_then(|j| context_attributes(&j))).try_fold(
            HashSet::new(),
            |mut acc, used| {
                acc.extend(used?);
                Some(acc)
            },
        );
        Ok(Engine {
            context_uses,
            time: std::sync::Mutex::new(None),
            any: set_of(&[any]),
            servers,
            items,
            count: all.policies().filter(|p| !p.id().to_string().starts_with("portcullis:")).count(),
            digest: digest(files),
            offset_minutes,
            actions,
        })
    }

    /// `context.time` for `now_ms`, to the second (built once per second).
    fn time(&self, now_ms: i64) -> RestrictedExpression {
        let second = now_ms.div_euclid(1000);
        let mut cached = self.time.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match cached.as_ref() {
            Some((s, time)) if *s == second => time.clone(),
            _ => {
                let time = input::time(second * 1000, self.offset_minutes);
                *cached = Some((second, time.clone()));
                time
            }
        }
    }

    /// The policies that could apply to `ask`.
    fn set_for(&self, ask: &Ask<'_>) -> &PolicySet {
        let name = match ask.act {
            Act::CallTool { name, .. } | Act::GetPrompt { name, .. } => Some(name),
            _ => None,
        };
        if let Some(name) = name
            && let Some(set) = self.items.get(ask.server).and_then(|by_name| by_name.get(name))
        {
            return set;
        }
        self.servers.get(ask.server).unwrap_or(&self.any)
    }

    /// Decides `ask`: allowed when a permit matches, no forbid does, and nothing failed.
    pub fn decide(&self, ask: &Ask<'_>) -> Decision {
        let (request, entities) = match self.request(ask, false) {
            Ok(built) => built,
            Err(why) => return Decision { allowed: false, policies: Vec::new(), errors: vec![why] },
        };
        let response = Authorizer::new().is_authorized(&request, self.set_for(ask), &entities);
        let diagnostics = response.diagnostics();
        let errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
        let policies = diagnostics.reason().map(ToString::to_string).collect();
        let allowed = response.decision() == cedar_policy::Decision::Allow && errors.is_empty();
        Decision { allowed, policies, errors }
    }

    /// Whether some call matching `ask` (its arguments unknown) could be allowed.
    pub fn may_list(&self, ask: &Ask<'_>) -> bool {
        let Ok((request, entities)) = self.request(ask, true) else { return false };
        let response = Authorizer::new().is_authorized_partial(&request, self.set_for(ask), &entities);
        response.decision() != Some(cedar_policy::Decision::Deny) && response.definitely_errored().next().is_none()
    }

    /// The Cedar request and entities for `ask`; with `unknown_args`, the arguments are a
    /// partial-evaluation unknown.
    fn request(&self, ask: &Ask<'_>, unknown_args: bool) -> Result<(Request, Entities), String> {
        let p = ask.principal;
        let groups: HashSet<EntityUid> = p.groups.iter().map(|g| uid("Portcullis::Group", g)).collect();
        let name_attr = || HashMap::from([("name".to_owned(), RestrictedExpression::new_string(p.name.clone()))]);
        let principal = match p.kind {
            PrincipalKind::User => Entity::new(uid("Portcullis::User", &p.name), name_attr(), groups.clone()),
            PrincipalKind::Service => {
                Entity::new(uid("Portcullis::ServiceAccount", &p.name), name_attr(), groups.clone())
            }
            PrincipalKind::Anonymous => Ok(Entity::new_no_attrs(uid("Portcullis::Anonymous", ""), HashSet::new())),
        }
        .map_err(|e| e.to_string())?;
        let server_uid = uid("Portcullis::Server", ask.server);
        let trusted = ask.trusted;
        let server = Entity::new(
            server_uid.clone(),
            HashMap::from([
                ("name".to_owned(), RestrictedExpression::new_string(ask.server.to_owned())),
                ("trusted".to_owned(), RestrictedExpression::new_bool(trusted)),
            ]),
            HashSet::new(),
        )
        .map_err(|e| e.to_string())?;
        let parent = HashSet::from([server_uid.clone()]);
        let item = |ty: &str, name_key: &str, name: &str, more: Vec<(String, RestrictedExpression)>| {
            let mut attrs = HashMap::from([
                ("server".to_owned(), RestrictedExpression::new_string(ask.server.to_owned())),
                (name_key.to_owned(), RestrictedExpression::new_string(name.to_owned())),
            ]);
            attrs.extend(more);
            Entity::new(uid(ty, &format!("{}/{name}", ask.server)), attrs, parent.clone()).map_err(|e| e.to_string())
        };
        let (resource, args) = match ask.act {
            Act::Connect | Act::ListTools => (None, None),
            Act::CallTool { name, args, annotations } => {
                let annotations = annotations_record(annotations.filter(|_| trusted));
                (
                    Some(item("Portcullis::Tool", "name", name, vec![("annotations".to_owned(), annotations)])?),
                    Some(args),
                )
            }
            Act::GetPrompt { name, args } => (Some(item("Portcullis::Prompt", "name", name, Vec::new())?), Some(args)),
            Act::ReadResource { uri } => (Some(item("Portcullis::Resource", "uri", uri, Vec::new())?), None),
        };
        let resource_uid = resource.as_ref().map_or_else(|| server_uid.clone(), |r| r.uid());
        let (client_name, client_version) = ask.client.unwrap_or(("unknown", "unknown"));
        let client = RestrictedExpression::new_record([
            ("name".to_owned(), RestrictedExpression::new_string(client_name.to_owned())),
            ("version".to_owned(), RestrictedExpression::new_string(client_version.to_owned())),
        ])
        .map_err(|e| e.to_string())?;
        let servers = ask.servers.iter().cloned();
        let uses = |attr: &str| self.context_uses.as_ref().is_none_or(|u| u.contains(attr));
        let mut context = vec![("client".to_owned(), client)];
        if uses("servers") {
            context.push((
                "servers".to_owned(),
                RestrictedExpression::new_set(servers.map(RestrictedExpression::new_string)),
            ));
        }
        if uses("time") {
            context.push(("time".to_owned(), self.time(ask.now_ms)));
        }
        match args {
            None => {}
            Some(_) if unknown_args => context.push(("args".to_owned(), RestrictedExpression::new_unknown("args"))),
            Some(Args::Unknown) => context.push(("args".to_owned(), RestrictedExpression::new_unknown("args"))),
            Some(Args::Known(Some(Value::Object(map)))) => context.push(("args".to_owned(), input::record(map))),
            Some(Args::Known(_)) => context.push(("args".to_owned(), input::empty_record())),
        }
        let context = Context::from_pairs(context).map_err(|e| e.to_string())?;
        let action = self.actions.get(ask.act.action()).cloned().ok_or("unknown action")?;
        let principal_uid = principal.uid();
        let request = Request::new(principal_uid, action, resource_uid, context, None).map_err(|e| e.to_string())?;
        let mut entities: Vec<Entity> = vec![principal, server];
        entities.extend(resource);
        entities.extend(groups.into_iter().map(|g| Entity::new_no_attrs(g, HashSet::new())));
        let entities = Entities::from_entities(entities, None).map_err(|e| e.to_string())?;
        Ok((request, entities))
    }
}

/// The attributes of `context` a policy (its JSON form) reads, or `None` when it uses
/// `context` otherwise than by reading or testing one attribute.
fn context_attributes(policy: &Value) -> Option<HashSet<String>> {
    fn walk(v: &Value, found: &mut HashSet<String>, whole: &mut bool) {
        match v {
            Value::Object(map) => {
                for op in [".", "has"] {
                    if let Some(inner) = map.get(op)
                        && inner["left"].get("Var").and_then(Value::as_str) == Some("context")
                    {
                        match inner["attr"].as_str() {
                            Some(attr) => {
                                found.insert(attr.to_owned());
                            }
                            // An extended `has` (a list of attributes): its first one.
                            None => match inner["attr"].as_array().and_then(|a| a.first()).and_then(Value::as_str) {
                                Some(attr) => {
                                    found.insert(attr.to_owned());
                                }
                                None => *whole = true,
                            },
                        }
                        return;
                    }
                }
                if map.get("Var").and_then(Value::as_str) == Some("context") {
                    *whole = true;
                }
                for inner in map.values() {
                    walk(inner, found, whole);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, found, whole)),
            _ => {}
        }
    }
    let (mut found, mut whole) = (HashSet::new(), false);
    walk(&policy["conditions"], &mut found, &mut whole);
    (!whole).then_some(found)
}

/// A tool's annotations as the `annotations` record: the hints of the schema with the right
/// types, nothing else.
fn annotations_record(annotations: Option<&Value>) -> RestrictedExpression {
    let mut pairs = Vec::new();
    if let Some(Value::Object(map)) = annotations {
        for key in ["readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"] {
            if let Some(b) = map.get(key).and_then(Value::as_bool) {
                pairs.push((key.to_owned(), RestrictedExpression::new_bool(b)));
            }
        }
        if let Some(t) = map.get("title").and_then(Value::as_str) {
            pairs.push(("title".to_owned(), RestrictedExpression::new_string(t.to_owned())));
        }
    }
    RestrictedExpression::new_record(pairs).unwrap_or_else(|_| input::empty_record())
}

#[cfg(test)]
mod tests;
