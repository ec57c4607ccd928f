//! `PORTCULLIS_SECTION__KEY=value` overrides, applied to the parsed file before validation.
//!
//! `PORTCULLIS_GATEWAY__LISTEN=0.0.0.0:8080` sets `gateway.listen`;
//! `PORTCULLIS_SERVERS__GITHUB__URL=…` sets `url` of the server named `github` (a `_` in the
//! variable also matches a `-` in the name). A value is read as TOML when it parses as a
//! boolean, number or array, and as a plain string otherwise (quote it to force a string).

const PREFIX: &str = "PORTCULLIS_";

pub(super) fn apply_overrides(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<String>,
) {
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        // Variables without `__` (PORTCULLIS_CONFIG, PORTCULLIS_MASTER_KEY) are not overrides.
        if !rest.contains("__") {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let value = parse_value(&raw);
        if let Err(why) = set(table, &path, value) {
            problems.push(format!("environment {name}: {why}"));
        }
    }
}

fn parse_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => match t.remove("v") {
            Some(v @ (toml::Value::Boolean(_) | toml::Value::Integer(_) | toml::Value::Array(_))) => v,
            Some(toml::Value::String(s)) if raw.trim_start().starts_with(['"', '\'']) => toml::Value::String(s),
            _ => toml::Value::String(raw.to_owned()),
        },
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [section, key] if section != "servers" => {
            let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = entry else {
                return Err(format!("[{section}] is not a table"));
            };
            t.insert(key.clone(), value);
            Ok(())
        }
        [servers, server, key] if servers == "servers" => {
            let Some(toml::Value::Array(items)) = table.get_mut("servers") else {
                return Err("no [[servers]] in the file".to_owned());
            };
            let wanted = server.replace('_', "-");
            let found = items.iter_mut().find_map(|item| {
                let t = item.as_table_mut()?;
                let name = t.get("name")?.as_str()?.replace('_', "-");
                (name == wanted).then_some(t)
            });
            let Some(t) = found else {
                return Err(format!("no server named {server:?}"));
            };
            t.insert(key.clone(), value);
            Ok(())
        }
        _ => Err("expected PORTCULLIS_SECTION__KEY or PORTCULLIS_SERVERS__NAME__KEY".to_owned()),
    }
}
