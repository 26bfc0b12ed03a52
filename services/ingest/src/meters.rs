//! The meters of every organization, kept current by watching `ENTITIES`
//! (not by a request per measurement), and the validation of measurements
//! against them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use chrono::DateTime;
use serde_json::{Map, Value};
use tokio::sync::watch;

use meterline_shared::envelope::EntityEvent;
use meterline_shared::schema::is_date_time;
use meterline_shared::subjects::validate_token;

use crate::model::{ErrorType, Measurement, MAX_UID_LEN};
use crate::wire::Wire;

/// The data-field categories of a meter, as measurement keys.
pub const TEXT_CATEGORIES: [&str; 5] = ["who", "what", "where", "other", "metadata"];
pub const NUMBER_CATEGORIES: [&str; 3] = ["measure", "cost", "income"];

/// What ingest needs of a meter: its id and the category of each field.
#[derive(Debug, Clone, PartialEq)]
pub struct Meter {
    pub id: String,
    pub code: String,
    /// field code → category key (`who`, `measure`, ...).
    pub fields: HashMap<String, &'static str>,
}

impl Meter {
    /// From a meter entity's state; `None` if it has no usable code.
    pub fn from_state(state: &Value) -> Option<Meter> {
        let id = state.get("id")?.as_str()?.to_owned();
        let code = state.get("code")?.as_str()?.to_owned();
        let mut fields = HashMap::new();
        for key in ["dataFields", "derivedFields"] {
            for f in state
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let (Some(code), Some(cat)) = (
                    f.get("code").and_then(Value::as_str),
                    f.get("category").and_then(Value::as_str),
                ) else {
                    continue;
                };
                let lower = cat.to_ascii_lowercase();
                if let Some(c) = TEXT_CATEGORIES
                    .iter()
                    .chain(NUMBER_CATEGORIES.iter())
                    .find(|c| **c == lower)
                {
                    fields.insert(code.to_owned(), *c);
                }
            }
        }
        Some(Meter { id, code, fields })
    }
}

/// (org, meter code) → meter, plus the `ENTITIES` sequence applied so far.
#[derive(Default)]
pub struct Meters {
    inner: RwLock<HashMap<(String, String), Arc<Meter>>>,
    /// meter id → code, to drop the old code when a meter is renamed.
    codes: RwLock<HashMap<(String, String), String>>,
    applied: watch::Sender<u64>,
}

impl Meters {
    pub fn get(&self, org: &str, code: &str) -> Option<Arc<Meter>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(org.to_owned(), code.to_owned()))
            .cloned()
    }

    /// Applies one `ENTITIES` message about a meter.
    pub fn apply(&self, seq: u64, ev: &EntityEvent) {
        let key_id = (ev.org_id.clone(), ev.entity_id.clone());
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let mut codes = self.codes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old_code) = codes.remove(&key_id) {
            inner.remove(&(ev.org_id.clone(), old_code));
        }
        if !ev.is_tombstone() {
            if let Some(m) = ev.new.as_ref().and_then(Meter::from_state) {
                codes.insert(key_id, m.code.clone());
                inner.insert((ev.org_id.clone(), m.code.clone()), Arc::new(m));
            }
        }
        drop(inner);
        drop(codes);
        self.mark(seq);
    }

    pub fn mark(&self, seq: u64) {
        self.applied.send_if_modified(|s| {
            let newer = seq > *s;
            if newer {
                *s = seq;
            }
            newer
        });
    }

    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub async fn wait_for(&self, seq: u64) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|s| *s >= seq).await;
    }
}

/// A measurement refused by validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub error_type: ErrorType,
    pub message: String,
}

fn fail(error_type: ErrorType, message: impl Into<String>) -> Failure {
    Failure {
        error_type,
        message: message.into(),
    }
}

/// The meter code of a raw measurement, if it has a usable one.
pub fn meter_code(raw: &Value) -> Option<&str> {
    raw.get("meter").and_then(Value::as_str)
}

/// A valid measurement: what commit needs of it, and where its MessagePack
/// encoding is in the buffer validation wrote it to.
#[derive(Debug, Clone)]
pub struct Valid {
    pub uid: String,
    /// The uid was generated: it takes no part in de-duplication.
    pub generated_uid: bool,
    pub meter: Arc<Meter>,
    pub encoded: std::ops::Range<usize>,
}

/// Validates one measurement as sent and, if valid, appends its MessagePack
/// encoding to `out`. The common case (well-formed) takes the fast path of
/// [`crate::wire`]; anything else is read as a JSON tree by [`validate`],
/// which names the problem.
pub fn validate_raw(
    raw: &serde_json::value::RawValue,
    mut meter_of: impl FnMut(&str) -> Option<Arc<Meter>>,
    generated_uid: impl FnOnce() -> String,
    out: &mut Vec<u8>,
) -> Result<Valid, Failure> {
    let start = out.len();
    let Some(w) = Wire::parse(raw.get()) else {
        let value: Value = serde_json::from_str(raw.get()).map_err(|e| {
            fail(
                ErrorType::InvalidMeasurement,
                format!("unreadable measurement: {e}"),
            )
        })?;
        let meter = meter_code(&value).and_then(&mut meter_of);
        let m = validate(&value, meter.as_deref(), generated_uid)?;
        let meter = meter.ok_or_else(|| fail(ErrorType::UndefinedMeter, "meter is not defined"))?;
        crate::wire::encode_measurement(&m, out)
            .map_err(|e| fail(ErrorType::InvalidMeasurement, e.to_string()))?;
        return Ok(Valid {
            uid: m.uid,
            generated_uid: m.generated_uid,
            meter,
            encoded: start..out.len(),
        });
    };
    validate_wire(&w, meter_of, generated_uid, out)
}

/// Validates a measurement read by the fast path and appends its
/// MessagePack encoding to `out`.
pub fn validate_wire(
    w: &Wire,
    mut meter_of: impl FnMut(&str) -> Option<Arc<Meter>>,
    generated_uid: impl FnOnce() -> String,
    out: &mut Vec<u8>,
) -> Result<Valid, Failure> {
    let start = out.len();
    let uid = w
        .uid
        .as_ref()
        .map(|u| u.0.as_ref())
        .filter(|u| !u.is_empty());
    if uid.is_some_and(|u| u.chars().count() > MAX_UID_LEN) {
        return Err(fail(
            ErrorType::InvalidUid,
            format!("uid is longer than {MAX_UID_LEN} characters"),
        ));
    }
    validate_token("meter", &w.meter.0).map_err(|e| fail(ErrorType::UndefinedMeter, e.message))?;
    check_account(&w.account.0)?;
    check_times(&w.ts.0, w.ets.as_ref().map(|e| e.0.as_ref()))?;
    let meter = meter_of(&w.meter.0).ok_or_else(|| {
        fail(
            ErrorType::UndefinedMeter,
            format!("meter {:?} is not defined", w.meter.0),
        )
    })?;
    check_fields(
        w.field_codes(),
        w.metadata
            .0
            .iter()
            .map(|(k, v)| (k.0.as_ref(), v.0.as_ref())),
        &meter,
    )?;
    let (uid, generated) = match uid {
        Some(u) => (u.to_owned(), false),
        None => (generated_uid(), true),
    };
    w.encode(&uid, generated, out);
    Ok(Valid {
        uid,
        generated_uid: generated,
        meter,
        encoded: start..out.len(),
    })
}

fn check_account(account: &str) -> Result<(), Failure> {
    if account.is_empty() || account.chars().count() > 80 {
        return Err(fail(
            ErrorType::InvalidField,
            "account must be 1 to 80 characters",
        ));
    }
    Ok(())
}

fn check_times(ts: &str, ets: Option<&str>) -> Result<(), Failure> {
    if !is_date_time(ts) {
        return Err(fail(
            ErrorType::InvalidTimestamp,
            format!("ts {ts:?} is not an ISO-8601 date-time"),
        ));
    }
    if let Some(e) = ets {
        if !is_date_time(e) {
            return Err(fail(
                ErrorType::InvalidTimestamp,
                format!("ets {e:?} is not an ISO-8601 date-time"),
            ));
        }
        if let (Ok(a), Ok(b)) = (
            DateTime::parse_from_rfc3339(ts),
            DateTime::parse_from_rfc3339(e),
        ) {
            if b < a {
                return Err(fail(ErrorType::InvalidTimestamp, "ets is before ts"));
            }
        }
    }
    Ok(())
}

/// Every data field of a measurement (`codes`: category and code) is a
/// field of its meter, in its category, no code is used in two categories,
/// and no `metadata` value is longer than 256 characters.
fn check_fields<'s>(
    codes: impl Iterator<Item = (&'static str, &'s str)> + Clone,
    mut metadata: impl Iterator<Item = (&'s str, &'s str)>,
    meter: &Meter,
) -> Result<(), Failure> {
    // Meters have at most 30 fields: a list beats a map here.
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for (cat, code) in codes.clone() {
        if let Some((_, other)) = seen.iter().find(|(c, _)| *c == code) {
            return Err(fail(
                ErrorType::DuplicateField,
                format!("field {code:?} is given in both {other} and {cat}"),
            ));
        }
        seen.push((code, cat));
    }
    for (cat, code) in codes {
        match meter.fields.get(code) {
            Some(c) if *c == cat => {}
            Some(c) => {
                return Err(fail(
                    ErrorType::UndefinedField,
                    format!(
                        "field {code:?} of meter {:?} is a {c} field, not {cat}",
                        meter.code
                    ),
                ))
            }
            None => {
                return Err(fail(
                    ErrorType::UndefinedField,
                    format!("meter {:?} has no field {code:?}", meter.code),
                ))
            }
        }
    }
    if let Some((code, _)) = metadata.find(|(_, v)| v.chars().count() > 256) {
        return Err(fail(
            ErrorType::InvalidField,
            format!("metadata.{code} is longer than 256 characters"),
        ));
    }
    Ok(())
}

/// The (category, code) of every data field of a measurement.
fn measurement_codes(m: &Measurement) -> impl Iterator<Item = (&'static str, &str)> + Clone {
    let text: [(&'static str, &BTreeMap<String, String>); 5] = [
        ("who", &m.who),
        ("what", &m.what),
        ("where", &m.where_),
        ("other", &m.other),
        ("metadata", &m.metadata),
    ];
    let numbers: [(&'static str, &BTreeMap<String, f64>); 3] = [
        ("measure", &m.measure),
        ("cost", &m.cost),
        ("income", &m.income),
    ];
    text.into_iter()
        .flat_map(|(c, map)| map.keys().map(move |k| (c, k.as_str())))
        .chain(
            numbers
                .into_iter()
                .flat_map(|(c, map)| map.keys().map(move |k| (c, k.as_str()))),
        )
}

/// Validates one measurement given as a JSON tree against its meter.
/// `generated_uid` is used when the measurement has no uid of its own.
pub fn validate(
    raw: &Value,
    meter: Option<&Meter>,
    generated_uid: impl FnOnce() -> String,
) -> Result<Measurement, Failure> {
    let obj = raw.as_object().ok_or_else(|| {
        fail(
            ErrorType::InvalidMeasurement,
            "a measurement must be a JSON object",
        )
    })?;
    let text = |k: &str| -> Result<Option<String>, Failure> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(fail(
                ErrorType::InvalidField,
                format!("{k} must be a string"),
            )),
        }
    };
    let meter_code =
        text("meter")?.ok_or_else(|| fail(ErrorType::MissingField, "meter is required"))?;
    let account =
        text("account")?.ok_or_else(|| fail(ErrorType::MissingField, "account is required"))?;
    let ts = text("ts")?.ok_or_else(|| fail(ErrorType::MissingField, "ts is required"))?;
    validate_token("meter", &meter_code).map_err(|e| fail(ErrorType::UndefinedMeter, e.message))?;
    check_account(&account)?;
    let uid = match obj.get("uid") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if s.chars().count() > MAX_UID_LEN => {
            return Err(fail(
                ErrorType::InvalidUid,
                format!("uid is longer than {MAX_UID_LEN} characters"),
            ));
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(fail(ErrorType::InvalidUid, "uid must be a string")),
    };
    let ets = text("ets")?;
    check_times(&ts, ets.as_deref())?;
    let meter = meter.ok_or_else(|| {
        fail(
            ErrorType::UndefinedMeter,
            format!("meter {meter_code:?} is not defined"),
        )
    })?;
    for key in obj.keys() {
        let known = matches!(key.as_str(), "uid" | "meter" | "account" | "ts" | "ets")
            || TEXT_CATEGORIES.contains(&key.as_str())
            || NUMBER_CATEGORIES.contains(&key.as_str());
        if !known {
            return Err(fail(
                ErrorType::InvalidField,
                format!("unknown field {key:?}"),
            ));
        }
    }
    let mut m = Measurement {
        generated_uid: uid.is_none(),
        uid: uid.unwrap_or_else(generated_uid),
        meter: meter_code,
        account,
        ts,
        ets,
        who: BTreeMap::new(),
        what: BTreeMap::new(),
        where_: BTreeMap::new(),
        other: BTreeMap::new(),
        metadata: BTreeMap::new(),
        measure: BTreeMap::new(),
        cost: BTreeMap::new(),
        income: BTreeMap::new(),
    };
    for cat in TEXT_CATEGORIES.iter().chain(NUMBER_CATEGORIES.iter()) {
        let Some(v) = obj.get(*cat) else { continue };
        if v.is_null() {
            continue;
        }
        let map: &Map<String, Value> = v
            .as_object()
            .ok_or_else(|| fail(ErrorType::InvalidField, format!("{cat} must be an object")))?;
        for (code, value) in map {
            if NUMBER_CATEGORIES.contains(cat) {
                let n = value.as_f64().filter(|f| f.is_finite()).ok_or_else(|| {
                    fail(
                        ErrorType::InvalidField,
                        format!("{cat}.{code} must be a number, not {value}"),
                    )
                })?;
                let target = match *cat {
                    "measure" => &mut m.measure,
                    "cost" => &mut m.cost,
                    _ => &mut m.income,
                };
                target.insert(code.clone(), n);
            } else {
                let s = value.as_str().ok_or_else(|| {
                    fail(
                        ErrorType::InvalidField,
                        format!("{cat}.{code} must be a string, not {value}"),
                    )
                })?;
                let target = match *cat {
                    "who" => &mut m.who,
                    "what" => &mut m.what,
                    "where" => &mut m.where_,
                    "other" => &mut m.other,
                    _ => &mut m.metadata,
                };
                target.insert(code.clone(), s.to_owned());
            }
        }
    }
    check_fields(
        measurement_codes(&m),
        m.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        meter,
    )?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meter() -> Meter {
        Meter::from_state(&json!({
            "id": "m-1", "code": "api",
            "dataFields": [
                {"category": "MEASURE", "code": "calls", "name": "Calls"},
                {"category": "WHO", "code": "user", "name": "User"},
                {"category": "COST", "code": "price", "name": "Price"}
            ],
            "derivedFields": []
        }))
        .unwrap()
    }

    fn check(raw: Value) -> Result<Measurement, Failure> {
        validate(&raw, Some(&meter()), || "generated".into())
    }

    #[test]
    fn a_good_measurement_is_kept_whole() {
        let m = check(json!({"uid": "u1", "meter": "api", "account": "acme", "ts": "2024-05-01T10:00:00Z",
                             "measure": {"calls": 3}, "who": {"user": "ann"}, "cost": {"price": 0.5}}))
        .unwrap();
        assert_eq!(m.uid, "u1");
        assert!(!m.generated_uid);
        assert_eq!(m.measure["calls"], 3.0);
        assert_eq!(m.who["user"], "ann");
        let m = check(json!({"meter": "api", "account": "acme", "ts": "2024-05-01T10:00:00Z"}))
            .unwrap();
        assert_eq!(m.uid, "generated");
        assert!(m.generated_uid);
    }

    #[test]
    fn each_kind_of_bad_measurement_has_its_error_type() {
        let ts = "2024-05-01T10:00:00Z";
        let cases = [
            (json!([1]), ErrorType::InvalidMeasurement),
            (json!({"account": "a", "ts": ts}), ErrorType::MissingField),
            (json!({"meter": "api", "ts": ts}), ErrorType::MissingField),
            (
                json!({"meter": "api", "account": "a"}),
                ErrorType::MissingField,
            ),
            (
                json!({"meter": "api", "account": "a", "ts": "yesterday"}),
                ErrorType::InvalidTimestamp,
            ),
            (
                json!({"meter": "api", "account": "a", "ts": ts, "ets": "2024-04-01T00:00:00Z"}),
                ErrorType::InvalidTimestamp,
            ),
            (
                json!({"meter": "api", "account": "a", "ts": ts, "measure": {"calls": "many"}}),
                ErrorType::InvalidField,
            ),
            (
                json!({"meter": "api", "account": "a", "ts": ts, "measure": {"nope": 1}}),
                ErrorType::UndefinedField,
            ),
            (
                json!({"meter": "api", "account": "a", "ts": ts, "who": {"calls": "x"}}),
                ErrorType::UndefinedField,
            ),
            (
                json!({"meter": "api", "account": "a", "ts": ts, "measure": {"calls": 1}, "who": {"calls": "x"}}),
                ErrorType::DuplicateField,
            ),
            (
                json!({"meter": "api", "account": "a", "ts": ts, "uid": "u".repeat(51)}),
                ErrorType::InvalidUid,
            ),
            (
                json!({"meter": "a.b", "account": "a", "ts": ts}),
                ErrorType::UndefinedMeter,
            ),
            (
                json!({"meter": "api", "account": "a", "ts": ts, "colour": "red"}),
                ErrorType::InvalidField,
            ),
        ];
        for (raw, want) in cases {
            let got = check(raw.clone()).expect_err(&raw.to_string());
            assert_eq!(got.error_type, want, "{raw}: {}", got.message);
        }
        let unknown = validate(
            &json!({"meter": "other", "account": "a", "ts": ts}),
            None,
            || "g".into(),
        );
        assert_eq!(unknown.unwrap_err().error_type, ErrorType::UndefinedMeter);
    }

    #[test]
    fn meters_follow_renames_and_deletes() {
        use meterline_shared::envelope::Action;
        let meters = Meters::default();
        let ev = |action, new: Option<Value>| EntityEvent {
            id: "e".into(),
            event_name: "x".into(),
            event_time: chrono::Utc::now(),
            org_id: "o".into(),
            entity_type: "meter".into(),
            entity_id: "m-1".into(),
            action,
            actor: "t".into(),
            new,
            old: None,
        };
        meters.apply(
            1,
            &ev(
                Action::Created,
                Some(json!({"id": "m-1", "code": "api", "dataFields": []})),
            ),
        );
        assert!(meters.get("o", "api").is_some());
        meters.apply(
            2,
            &ev(
                Action::Updated,
                Some(json!({"id": "m-1", "code": "api2", "dataFields": []})),
            ),
        );
        assert!(meters.get("o", "api").is_none());
        assert!(meters.get("o", "api2").is_some());
        meters.apply(3, &ev(Action::Deleted, None));
        assert!(meters.get("o", "api2").is_none());
        assert_eq!(meters.applied(), 3);
    }
}
