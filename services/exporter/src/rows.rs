//! What a job writes for each stored entity version: the rows of its
//! export type, filtered, masked and encoded as lines of the file.
//!
//! [`RowFormat`] holds everything a job decides about its rows (format,
//! columns, ad-hoc `startDate`, secret fields, pricing-band expansion), so
//! the replay turns versions into finished lines as it reads them and the
//! file writer only joins lines into parts.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::Value;

use meterline_shared::registry::{self, EntityType};
use meterline_shared::{schema, seal};

use crate::format::{encode_row, Format, Row};

/// One kind of file a job writes: an `operationalDataTypes` value.
#[derive(Debug, Clone, Copy)]
pub struct ExportKind {
    /// The `operationalDataTypes` value, e.g. `ACCOUNTS`.
    pub export_type: &'static str,
    /// The `type=` of keys and file names, e.g. `account`.
    pub token: &'static str,
    /// The entity type whose history is replayed.
    pub source: &'static EntityType,
    /// `PRICING_BANDS`: bands live inside pricings; one row per band.
    pub bands: bool,
}

/// The `operationalDataTypes` value of pricing bands, which have no
/// collection of their own.
pub const PRICING_BANDS: &str = "PRICING_BANDS";

impl ExportKind {
    fn of(export_type: &str) -> Option<ExportKind> {
        if export_type == PRICING_BANDS {
            return Some(ExportKind {
                export_type: PRICING_BANDS,
                token: "pricingband",
                source: registry::get("pricing")?,
                bands: true,
            });
        }
        let ty = registry::by_export_type(export_type)?;
        Some(ExportKind {
            export_type: ty.export_type?,
            token: ty.name,
            source: ty,
            bands: false,
        })
    }

    /// The columns of this kind's CSV files (before `deleted`).
    pub fn columns(&self) -> Vec<String> {
        if self.bands {
            let mut cols: Vec<String> = schema::columns("PricingBand")
                .into_iter()
                .map(str::to_owned)
                .collect();
            cols.extend(["pricingId".to_owned(), "bandType".to_owned()]);
            return cols;
        }
        columns(self.source)
    }

    /// Calls `each` with the rows a version of the source entity stands
    /// for, in order.
    fn expand(&self, mut row: Row, mut each: impl FnMut(&Row)) {
        if !self.bands {
            return each(&row);
        }
        let deleted = row.deleted;
        let state = row.map();
        let pricing = state.get("id").cloned().unwrap_or(Value::Null);
        for (field, kind) in [
            ("pricingBands", "PRICING"),
            ("overagePricingBands", "OVERAGE"),
        ] {
            for band in state
                .get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(mut state) = band.as_object().cloned() else {
                    continue;
                };
                state.insert("pricingId".into(), pricing.clone());
                state.insert("bandType".into(), Value::String(kind.into()));
                each(&Row::parsed(state, deleted));
            }
        }
    }
}

/// The operational data type names a request gives, checked.
pub fn export_types(value: Option<&Value>) -> Result<Vec<ExportKind>, String> {
    let list = value
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or("operationalDataTypes must list at least one entity type")?;
    let mut out: Vec<ExportKind> = Vec::new();
    for v in list {
        let name = v.as_str().unwrap_or_default();
        let kind = ExportKind::of(name).ok_or_else(|| {
            let mut known: Vec<&str> = registry::REGISTRY
                .iter()
                .filter_map(|t| t.export_type)
                .collect();
            known.push(PRICING_BANDS);
            format!(
                "entity type {v} cannot be exported; operationalDataTypes may hold {}",
                known.join(", ")
            )
        })?;
        if !out.iter().any(|t| t.export_type == kind.export_type) {
            out.push(kind);
        }
    }
    Ok(out)
}

/// Columns of a type's files: its response schema's properties, then its
/// parent's id if the schema lacks it.
fn columns(ty: &EntityType) -> Vec<String> {
    let mut cols: Vec<String> = schema::columns(ty.response)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Some(p) = ty.parent {
        if !cols.iter().any(|c| c == p.field) {
            cols.push(p.field.to_owned());
        }
    }
    cols
}

fn modified_since(row: &mut Row, since: DateTime<Utc>) -> bool {
    let state = row.map();
    ["dtLastModified", "dtCreated"]
        .iter()
        .filter_map(|f| state.get(*f).and_then(Value::as_str))
        .filter_map(|s| DateTime::parse_from_rfc3339(s).ok())
        .any(|t| t.with_timezone(&Utc) >= since)
}

/// How a job turns a version into lines of its file.
#[derive(Debug, Clone)]
pub struct RowFormat {
    kind: ExportKind,
    format: Format,
    columns: Vec<String>,
    /// Ad-hoc `startDate`: only entities modified since.
    since: Option<DateTime<Utc>>,
}

impl RowFormat {
    pub fn new(kind: ExportKind, format: Format, since: Option<DateTime<Utc>>) -> RowFormat {
        RowFormat {
            columns: kind.columns(),
            kind,
            format,
            since,
        }
    }

    /// Appends the lines `row` stands for to `out`: none if it is not
    /// modified since the job's `startDate`, one per band for pricing
    /// bands, else one; secret fields masked.
    pub fn lines(&self, mut row: Row, out: &mut Lines) {
        if let Some(since) = self.since {
            if !modified_since(&mut row, since) {
                return;
            }
        }
        let secrets = self.kind.source.secrets;
        if !secrets.is_empty() {
            let state = row.map();
            let mut v = Value::Object(std::mem::take(state));
            seal::mask_fields(secrets, &mut v);
            if let Value::Object(m) = v {
                *state = m;
            }
        }
        self.kind.expand(row, |row| {
            encode_row(self.format, &self.columns, row, &mut out.bytes);
            out.ends.push(out.bytes.len());
        });
    }
}

/// Encoded lines, back to back, and where each ends.
#[derive(Debug, Default)]
pub struct Lines {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Lines {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Appends a copy of `other`'s lines.
    pub fn append(&mut self, other: &Lines) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.ends.extend(other.ends.iter().map(|end| at + end));
    }

    /// Each line's bytes.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let line = &self.bytes[start..end];
            start = end;
            line
        })
    }

    /// The lines as shared buffers (one allocation for all), leaving
    /// this empty.
    pub fn take(&mut self) -> Vec<Bytes> {
        let all = Bytes::from(std::mem::take(&mut self.bytes));
        let mut start = 0;
        let out = self
            .ends
            .drain(..)
            .map(|end| {
                let line = all.slice(start..end);
                start = end;
                line
            })
            .collect();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn export_types_are_checked_against_the_registry() {
        let ok = export_types(Some(&json!([
            "ACCOUNTS",
            "BILLS",
            "ACCOUNTS",
            "PRICING_BANDS"
        ])))
        .unwrap();
        assert_eq!(
            ok.iter().map(|t| t.token).collect::<Vec<_>>(),
            ["account", "bill", "pricingband"]
        );
        let err = export_types(Some(&json!(["WIDGETS"]))).unwrap_err();
        assert!(err.contains("WIDGETS") && err.contains("ACCOUNTS"), "{err}");
        assert!(export_types(Some(&json!([]))).is_err());
        assert!(export_types(None).is_err());
    }

    #[test]
    fn pricing_bands_are_one_row_per_band_with_their_pricing() {
        let kind = ExportKind::of(PRICING_BANDS).unwrap();
        assert_eq!(kind.source.name, "pricing");
        let state = json!({"id": "p1",
            "pricingBands": [{"id": "b1", "lowerLimit": 0, "fixedPrice": 0, "unitPrice": 1.5},
                             {"id": "b2", "lowerLimit": 100, "fixedPrice": 0, "unitPrice": 1}],
            "overagePricingBands": [{"id": "b3", "lowerLimit": 0, "fixedPrice": 5, "unitPrice": 2}]});
        let mut rows = Vec::new();
        kind.expand(Row::parsed(state.as_object().unwrap().clone(), true), |r| {
            rows.push(r.clone())
        });
        assert_eq!(rows.len(), 3);
        assert!(rows
            .iter_mut()
            .all(|r| r.deleted && r.map()["pricingId"] == "p1"));
        assert_eq!(rows[2].map()["bandType"], "OVERAGE");
        let cols = kind.columns();
        assert_eq!(&cols[..2], ["id", "lowerLimit"]);
        assert!(cols.ends_with(&["pricingId".to_owned(), "bandType".to_owned()]));
    }

    #[test]
    fn child_types_carry_their_parent_id_column() {
        let cols = columns(registry::get("balancetransaction").unwrap());
        assert!(cols.iter().any(|c| c == "balanceId"), "{cols:?}");
        let cols = columns(registry::get("account").unwrap());
        assert_eq!(cols.first().map(String::as_str), Some("id"));
    }

    #[test]
    fn lines_are_filtered_by_start_date_and_expanded() {
        let kind = ExportKind::of(PRICING_BANDS).unwrap();
        let state = json!({"id": "p1", "dtLastModified": "2026-06-01T10:00:00Z",
            "pricingBands": [{"id": "b1", "lowerLimit": 0}, {"id": "b2", "lowerLimit": 100}]});
        let row = || Row::parsed(state.as_object().unwrap().clone(), false);
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let mut out = Lines::default();
        RowFormat::new(kind, Format::Jsonl, Some(at("2026-06-02T00:00:00Z")))
            .lines(row(), &mut out);
        assert!(out.is_empty(), "not modified since");
        let f = RowFormat::new(kind, Format::Jsonl, Some(at("2026-06-01T00:00:00Z")));
        f.lines(row(), &mut out);
        let lines: Vec<Value> = out
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["id"], "b2");
        assert_eq!(lines[1]["pricingId"], "p1");
        let taken = out.take();
        assert_eq!(taken.len(), 2);
        assert!(out.is_empty());
        assert!(taken.iter().all(|l| l.ends_with(b"\n")));
    }
}
