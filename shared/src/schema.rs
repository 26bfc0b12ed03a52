//! Validation of entity bodies against m3ter's own schemas.
//!
//! Meterline serves `openapi/meterline.json`, the part of m3ter's API
//! document it implements (cut by `tools/openapi_subset.py`). The same
//! document is the validator's input, so field names, required fields,
//! lengths, patterns, enums and numeric bounds come from one source.
//! Patterns are written for Java in the document; [`compile_pattern`]
//! translates the few Java-only constructs and anchors them as Java's
//! `matches()` does.

use std::collections::{BTreeSet, HashMap};
use std::sync::{LazyLock, Mutex};

use regex::Regex;
use serde_json::{Map, Value};

/// The OpenAPI document the gateway serves, as text.
pub const OPENAPI_JSON: &str = include_str!("../openapi/meterline.json");

static DOC: LazyLock<Value> = LazyLock::new(|| {
    serde_json::from_str(OPENAPI_JSON).expect("embedded OpenAPI document is valid JSON")
});

static PATTERNS: LazyLock<Mutex<HashMap<String, Option<Regex>>>> = LazyLock::new(Default::default);

/// The parsed OpenAPI document.
pub fn document() -> &'static Value {
    &DOC
}

fn schema(name: &str) -> Option<&'static Value> {
    DOC.pointer(&format!("/components/schemas/{name}"))
}

fn resolve(node: &'static Value) -> &'static Value {
    let mut node = node;
    for _ in 0..32 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(r) => match r.strip_prefix("#/components/schemas/").and_then(schema) {
                Some(target) => node = target,
                None => return node,
            },
            None => return node,
        }
    }
    node
}

/// Property names and their schema nodes, in document order.
pub type Properties = Vec<(&'static str, &'static Value)>;

/// A schema's properties (following `$ref` and `allOf`), in document order,
/// and its required fields.
pub fn flatten(name: &str) -> Option<(Properties, BTreeSet<&'static str>)> {
    let root = schema(name)?;
    let mut props: Vec<(&'static str, &'static Value)> = Vec::new();
    let mut required = BTreeSet::new();
    collect(root, &mut props, &mut required);
    Some((props, required))
}

fn collect(
    node: &'static Value,
    props: &mut Vec<(&'static str, &'static Value)>,
    required: &mut BTreeSet<&'static str>,
) {
    let node = resolve(node);
    if let Some(all) = node.get("allOf").and_then(Value::as_array) {
        for sub in all {
            collect(sub, props, required);
        }
    }
    if let Some(p) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in p {
            match props.iter_mut().find(|(name, _)| *name == k.as_str()) {
                Some(slot) => slot.1 = v,
                None => props.push((k.as_str(), v)),
            }
        }
    }
    if let Some(r) = node.get("required").and_then(Value::as_array) {
        required.extend(r.iter().filter_map(Value::as_str));
    }
}

/// Export columns of an entity type: its response schema's properties.
pub fn columns(response_schema: &str) -> Vec<&'static str> {
    flatten(response_schema)
        .map(|(p, _)| p.into_iter().map(|(k, _)| k).collect())
        .unwrap_or_default()
}

/// Translates a pattern written for `java.util.regex` into one the `regex`
/// crate accepts, anchored at both ends as Java's `String.matches` is.
pub fn compile_pattern(java: &str) -> Option<Regex> {
    let translated = java.replace(r"\p{Cntrl}", r"\p{Cc}");
    Regex::new(&format!("^(?:{translated})$")).ok()
}

fn pattern_matches(pattern: &str, value: &str) -> bool {
    let mut cache = PATTERNS.lock().unwrap_or_else(|e| e.into_inner());
    let re = cache.entry(pattern.to_owned()).or_insert_with(|| {
        let re = compile_pattern(pattern);
        if re.is_none() {
            tracing::warn!(pattern, "schema pattern cannot be compiled; not enforced");
        }
        re
    });
    re.as_ref().is_none_or(|re| re.is_match(value))
}

/// Options of one validation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// Required fields are not enforced (a partial document, e.g. written by
    /// a billing engine) when false.
    pub enforce_required: bool,
    /// Top-level fields allowed beyond the schema's own.
    pub also_allowed: &'a [&'a str],
    /// Schemas whose properties are also allowed at the top level (e.g. the
    /// response schema, so a body read with GET can be sent back with PUT).
    pub also_allowed_from: &'a [&'a str],
}

/// Validates `value` against the named schema. Unknown top-level fields are
/// rejected. Returns every problem found, each as `field: what is wrong`.
pub fn validate(name: &str, value: &Value, opts: Options<'_>) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let Some(root) = schema(name) else {
        return Err(vec![format!("no schema {name}")]);
    };
    let Some(obj) = value.as_object() else {
        return Err(vec!["the body must be a JSON object".into()]);
    };
    let (props, required) = flatten(name).unwrap_or_default();
    let mut allowed: BTreeSet<&str> = props.iter().map(|(k, _)| *k).collect();
    allowed.extend(opts.also_allowed.iter().copied());
    // Fields only the other schemas know are still checked against them.
    let mut extra: Vec<(&'static str, &'static Value)> = Vec::new();
    for other in opts.also_allowed_from {
        if let Some((p, _)) = flatten(other) {
            for (k, node) in p {
                if allowed.insert(k) {
                    extra.push((k, node));
                }
            }
        }
    }
    for key in obj.keys() {
        if !allowed.contains(key.as_str()) {
            errors.push(format!("{key}: unknown field"));
        }
    }
    if opts.enforce_required {
        for r in &required {
            if obj.get(*r).is_none_or(Value::is_null) {
                errors.push(format!("{r}: is required"));
            }
        }
    }
    let _ = root;
    for (k, v) in obj {
        if let Some((_, node)) = props
            .iter()
            .chain(extra.iter())
            .find(|(name, _)| *name == k.as_str())
        {
            check(node, v, k, opts.enforce_required, &mut errors);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn type_matches(ty: &str, v: &Value) -> bool {
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        _ => true,
    }
}

fn check(
    node: &'static Value,
    v: &Value,
    path: &str,
    enforce_required: bool,
    errors: &mut Vec<String>,
) {
    let node = resolve(node);
    if v.is_null() {
        return;
    }
    if let Some(all) = node.get("allOf").and_then(Value::as_array) {
        for sub in all {
            check(sub, v, path, enforce_required, errors);
        }
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = node.get(key).and_then(Value::as_array) {
            let ok = alts.iter().any(|alt| {
                let mut e = Vec::new();
                check(alt, v, path, enforce_required, &mut e);
                e.is_empty()
            });
            if !ok {
                errors.push(format!("{path}: does not match any allowed form"));
            }
        }
    }
    if let Some(ty) = node.get("type").and_then(Value::as_str) {
        if !type_matches(ty, v) {
            errors.push(format!("{path}: must be of type {ty}"));
            return;
        }
    }
    if let Some(options) = node.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            let names: Vec<String> = options.iter().map(|o| o.to_string()).collect();
            errors.push(format!("{path}: must be one of {}", names.join(", ")));
        }
    }
    match v {
        Value::String(s) => check_string(node, s, path, errors),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if let Some(min) = node.get("minimum").and_then(Value::as_f64) {
                if f < min {
                    errors.push(format!("{path}: must be at least {min}"));
                }
            }
            if let Some(max) = node.get("maximum").and_then(Value::as_f64) {
                if f > max {
                    errors.push(format!("{path}: must be at most {max}"));
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = node.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    errors.push(format!("{path}: must have at least {min} items"));
                }
            }
            if let Some(max) = node.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    errors.push(format!("{path}: must have at most {max} items"));
                }
            }
            if let Some(item) = node.get("items") {
                for (i, x) in items.iter().enumerate() {
                    check(item, x, &format!("{path}[{i}]"), enforce_required, errors);
                }
            }
        }
        Value::Object(map) => check_object(node, map, path, enforce_required, errors),
        _ => {}
    }
}

fn check_string(node: &Value, s: &str, path: &str, errors: &mut Vec<String>) {
    let len = s.chars().count() as u64;
    if let Some(min) = node.get("minLength").and_then(Value::as_u64) {
        if len < min {
            errors.push(if min == 1 {
                format!("{path}: must not be empty")
            } else {
                format!("{path}: must be at least {min} characters")
            });
        }
    }
    if let Some(max) = node.get("maxLength").and_then(Value::as_u64) {
        if len > max {
            errors.push(format!("{path}: must be at most {max} characters"));
        }
    }
    if let Some(p) = node.get("pattern").and_then(Value::as_str) {
        if !pattern_matches(p, s) {
            errors.push(format!(
                "{path}: has characters or a form that is not allowed"
            ));
        }
    }
    match node.get("format").and_then(Value::as_str) {
        Some("date") if chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_err() => {
            errors.push(format!("{path}: must be a date like 2024-01-31"));
        }
        Some("date-time") if !is_date_time(s) => {
            errors.push(format!(
                "{path}: must be an ISO-8601 date-time like 2024-01-31T00:00:00Z"
            ));
        }
        Some("email") if !is_email(s) => {
            errors.push(format!("{path}: must be an email address"));
        }
        _ => {}
    }
}

/// ISO-8601 date-times as m3ter accepts them: with an offset, or without one
/// (read as UTC).
pub fn is_date_time(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok()
        || chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").is_ok()
        || chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.fZ").is_ok()
}

fn is_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !s.chars().any(char::is_whitespace)
                && !domain.contains('@')
        }
        None => false,
    }
}

fn check_object(
    node: &'static Value,
    map: &Map<String, Value>,
    path: &str,
    enforce_required: bool,
    errors: &mut Vec<String>,
) {
    if let Some(max) = node.get("maxItems").and_then(Value::as_u64) {
        if map.len() as u64 > max {
            errors.push(format!("{path}: must have at most {max} entries"));
        }
    }
    let props = node.get("properties").and_then(Value::as_object);
    if let Some(props) = props {
        for (k, sub) in props {
            if let Some(x) = map.get(k) {
                check(sub, x, &format!("{path}.{k}"), enforce_required, errors);
            }
        }
    }
    if enforce_required {
        if let Some(req) = node.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if map.get(r).is_none_or(Value::is_null) {
                    errors.push(format!("{path}.{r}: is required"));
                }
            }
        }
    }
    if let Some(extra) = node.get("additionalProperties").filter(|a| a.is_object()) {
        for (k, x) in map {
            if props.is_none_or(|p| !p.contains_key(k)) {
                check(extra, x, &format!("{path}.{k}"), enforce_required, errors);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strict() -> Options<'static> {
        Options {
            enforce_required: true,
            ..Default::default()
        }
    }

    #[test]
    fn every_pattern_in_the_document_compiles() {
        fn walk(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(p)) = m.get("pattern") {
                        out.push(p.clone());
                    }
                    m.values().for_each(|x| walk(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        let mut patterns = Vec::new();
        walk(document(), &mut patterns);
        assert!(!patterns.is_empty());
        for p in patterns {
            assert!(compile_pattern(&p).is_some(), "{p}");
        }
    }

    #[test]
    fn m3ter_code_pattern_means_no_edge_whitespace_or_control_characters() {
        let p = r"^([^[\p{Cntrl}\s]])|([^[\p{Cntrl}\s]][[^[\p{Cntrl}\s]] ]*[^[\p{Cntrl}\s]])$";
        let re = compile_pattern(p).unwrap();
        for ok in ["a", "acme", "acme corp", "ACME_01"] {
            assert!(re.is_match(ok), "{ok}");
        }
        for bad in [" acme", "acme ", "ac\tme", "ac\u{1}me", ""] {
            assert!(!re.is_match(bad), "{bad:?}");
        }
    }

    #[test]
    fn account_request_is_checked_like_m3ter() {
        let ok = json!({"name": "Acme", "code": "acme", "emailAddress": "ops@acme.test"});
        validate("AccountRequest", &ok, strict()).unwrap();

        let errs = validate("AccountRequest", &json!({"name": "Acme"}), strict()).unwrap_err();
        assert!(errs.iter().any(|e| e == "code: is required"), "{errs:?}");
        assert!(
            errs.iter().any(|e| e == "emailAddress: is required"),
            "{errs:?}"
        );

        let long = json!({"name": "A", "code": "c".repeat(81), "emailAddress": "a@b.c"});
        let errs = validate("AccountRequest", &long, strict()).unwrap_err();
        assert_eq!(errs, vec!["code: must be at most 80 characters"]);

        let unknown = json!({"name": "A", "code": "c", "emailAddress": "a@b.c", "colour": "red"});
        let errs = validate("AccountRequest", &unknown, strict()).unwrap_err();
        assert_eq!(errs, vec!["colour: unknown field"]);

        let typed = json!({"name": 5, "code": "c", "emailAddress": "a@b.c"});
        assert!(validate("AccountRequest", &typed, strict()).is_err());
    }

    #[test]
    fn response_fields_can_be_allowed_for_round_trips() {
        let body = json!({"name": "A", "code": "c", "emailAddress": "a@b.c", "dtCreated": "2024-01-01T00:00:00Z"});
        assert!(validate("AccountRequest", &body, strict()).is_err());
        let opts = Options {
            enforce_required: true,
            also_allowed_from: &["AccountResponse"],
            also_allowed: &[],
        };
        validate("AccountRequest", &body, opts).unwrap();
    }

    #[test]
    fn columns_follow_the_response_schema() {
        let cols = columns("AccountResponse");
        for c in ["id", "version", "name", "code", "emailAddress", "dtCreated"] {
            assert!(cols.contains(&c), "{c} missing from {cols:?}");
        }
    }
}
