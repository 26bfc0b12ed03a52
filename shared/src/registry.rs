//! The entity registry: one table that drives every entity type.
//!
//! Each row gives a type its subject token, its event-name category, its
//! collection path under `/organizations/{orgId}/`, the m3ter schema its
//! bodies are validated against, the other entities it references, its date
//! fields (for scheduled events), its secrets and the fields a billing engine
//! may write that m3ter computes itself. Export columns are the properties of
//! the response schema (see [`crate::schema`]), so they follow m3ter's
//! document rather than a second list.

/// `configuration.` or `billing.`: the first word of a type's event names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Configuration,
    Billing,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Configuration => "configuration",
            Category::Billing => "billing",
        }
    }
}

/// Which request schema validates a body.
#[derive(Debug, Clone, Copy)]
pub enum RequestSchema {
    One(&'static str),
    /// Chosen by the value of `field`; `default` when the field is absent.
    By {
        field: &'static str,
        default: &'static str,
        variants: &'static [(&'static str, &'static str)],
    },
}

/// A field holding the id of another entity that must exist (and not be
/// deleted) when the field is set.
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    pub field: &'static str,
    pub target: &'static str,
    /// The field holds an array of ids.
    pub many: bool,
    /// Only checked when another field has this value (case-insensitive).
    pub when: Option<(&'static str, &'static str)>,
}

const fn r(field: &'static str, target: &'static str) -> Reference {
    Reference {
        field,
        target,
        many: false,
        when: None,
    }
}

const fn rs(field: &'static str, target: &'static str) -> Reference {
    Reference {
        field,
        target,
        many: true,
        when: None,
    }
}

/// A child collection: the parent's id comes from the path and is stored in
/// `field` (e.g. a balance transaction's `balanceId`).
#[derive(Debug, Clone, Copy)]
pub struct Parent {
    pub field: &'static str,
    pub target: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct EntityType {
    /// The subject token and registry key, e.g. `account`.
    pub name: &'static str,
    pub category: Category,
    /// Collection path below `/organizations/{orgId}/`.
    pub path: &'static str,
    pub parent: Option<Parent>,
    /// Schema of create/update bodies.
    pub request: RequestSchema,
    /// Schema of what reads return; also gives the export columns.
    pub response: &'static str,
    pub references: &'static [Reference],
    /// Date and date-time fields scheduled events may be configured on.
    pub date_fields: &'static [&'static str],
    /// `operationalDataTypes` value of export schedules, if exportable.
    pub export_type: Option<&'static str>,
    /// Dotted paths of fields that hold secrets: sealed before they are
    /// stored, masked when read.
    pub secrets: &'static [&'static str],
    /// Fields m3ter computes itself that the billing engine may write.
    pub engine_fields: &'static [&'static str],
    /// `code` is unique among live entities of this type in an org.
    pub unique_code: bool,
    /// Served by the gateway under `path` (service users and organizations are
    /// managed over the bus only).
    pub http: bool,
}

impl EntityType {
    /// `configuration.account` — add `.created` etc. for an event name.
    pub fn event_prefix(&self) -> String {
        format!("{}.{}", self.category.as_str(), self.name)
    }

    pub fn event_name(&self, action: crate::envelope::Action) -> String {
        format!("{}.{}", self.event_prefix(), action.as_str())
    }
}

use Category::{Billing, Configuration};

const fn entity(
    name: &'static str,
    category: Category,
    path: &'static str,
    request: &'static str,
    response: &'static str,
) -> EntityType {
    EntityType {
        name,
        category,
        path,
        parent: None,
        request: RequestSchema::One(request),
        response,
        references: &[],
        date_fields: &[],
        export_type: None,
        secrets: &[],
        engine_fields: &[],
        unique_code: false,
        http: true,
    }
}

/// Every entity type Meterline knows.
pub static REGISTRY: &[EntityType] = &[
    EntityType {
        references: &[r("parentAccountId", "account")],
        date_fields: &["billEpoch", "dtCreated", "dtLastModified"],
        export_type: Some("ACCOUNTS"),
        unique_code: true,
        ..entity(
            "account",
            Configuration,
            "accounts",
            "AccountRequest",
            "AccountResponse",
        )
    },
    EntityType {
        references: &[
            r("accountId", "account"),
            r("planId", "plan"),
            r("planGroupId", "plangroup"),
            r("contractId", "contract"),
        ],
        date_fields: &["startDate", "endDate", "billEpoch"],
        export_type: Some("ACCOUNT_PLANS"),
        ..entity(
            "accountplan",
            Configuration,
            "accountplans",
            "AccountPlanRequest",
            "AccountPlanResponse",
        )
    },
    EntityType {
        references: &[r("meterId", "meter")],
        export_type: Some("AGGREGATIONS"),
        unique_code: true,
        ..entity(
            "aggregation",
            Configuration,
            "aggregations",
            "AggregationRequest",
            "AggregationResponse",
        )
    },
    EntityType {
        references: &[
            r("accountId", "account"),
            r("contractId", "contract"),
            rs("productIds", "product"),
        ],
        date_fields: &["startDate", "endDate", "rolloverEndDate"],
        export_type: Some("BALANCES"),
        engine_fields: &["amount"],
        unique_code: true,
        ..entity(
            "balance",
            Billing,
            "balances",
            "BalanceRequest",
            "BalanceResponse",
        )
    },
    EntityType {
        parent: Some(Parent {
            field: "balanceId",
            target: "balance",
        }),
        references: &[r("transactionTypeId", "transactiontype")],
        date_fields: &["appliedDate", "transactionDate"],
        export_type: Some("BALANCE_TRANSACTIONS"),
        ..entity(
            "balancetransaction",
            Billing,
            "balances/{balanceId}/transactions",
            "BalanceTransactionRequest",
            "BalanceTransactionResponse",
        )
    },
    EntityType {
        references: &[r("accountId", "account")],
        date_fields: &[
            "billDate",
            "dueDate",
            "startDate",
            "endDate",
            "externalInvoiceDate",
        ],
        export_type: Some("BILLS"),
        ..entity("bill", Billing, "bills", "BillResponse", "BillResponse")
    },
    EntityType {
        parent: Some(Parent {
            field: "billId",
            target: "bill",
        }),
        date_fields: &["servicePeriodStartDate", "servicePeriodEndDate"],
        export_type: Some("BILL_LINE_ITEMS"),
        ..entity(
            "billlineitem",
            Billing,
            "bills/{billId}/lineitems",
            "BillLineItemResponse",
            "BillLineItemResponse",
        )
    },
    EntityType {
        references: &[r("accountId", "account"), r("contractId", "contract")],
        date_fields: &["billDate", "servicePeriodStartDate", "servicePeriodEndDate"],
        export_type: Some("CHARGES"),
        ..entity(
            "charge",
            Billing,
            "charges",
            "ChargeRequest",
            "ChargeResponse",
        )
    },
    EntityType {
        references: &[
            r("accountId", "account"),
            r("contractId", "contract"),
            rs("productIds", "product"),
        ],
        date_fields: &["startDate", "endDate", "billEpoch"],
        export_type: Some("COMMITMENTS"),
        engine_fields: &["amountSpent"],
        ..entity(
            "commitment",
            Configuration,
            "commitments",
            "CommitmentRequest",
            "CommitmentResponse",
        )
    },
    EntityType {
        references: &[r("productId", "product")],
        export_type: Some("COMPOUND_AGGREGATIONS"),
        unique_code: true,
        ..entity(
            "compoundaggregation",
            Configuration,
            "compoundaggregations",
            "CompoundAggregationRequest",
            "CompoundAggregationResponse",
        )
    },
    EntityType {
        references: &[r("accountId", "account")],
        date_fields: &["startDate", "endDate"],
        export_type: Some("CONTRACTS"),
        unique_code: true,
        ..entity(
            "contract",
            Configuration,
            "contracts",
            "ContractRequest",
            "ContractResponse",
        )
    },
    EntityType {
        references: &[r("productId", "product")],
        export_type: Some("METERS"),
        unique_code: true,
        ..entity(
            "meter",
            Configuration,
            "meters",
            "MeterRequest",
            "MeterResponse",
        )
    },
    EntityType {
        references: &[
            r("planTemplateId", "plantemplate"),
            r("accountId", "account"),
        ],
        export_type: Some("PLANS"),
        unique_code: true,
        ..entity(
            "plan",
            Configuration,
            "plans",
            "PlanRequest",
            "PlanResponse",
        )
    },
    EntityType {
        references: &[r("accountId", "account")],
        export_type: Some("PLAN_GROUPS"),
        unique_code: true,
        ..entity(
            "plangroup",
            Configuration,
            "plangroups",
            "PlanGroupRequest",
            "PlanGroupResponse",
        )
    },
    EntityType {
        references: &[r("planGroupId", "plangroup"), r("planId", "plan")],
        export_type: Some("PLAN_GROUP_LINKS"),
        ..entity(
            "plangrouplink",
            Configuration,
            "plangrouplinks",
            "PlanGroupLinkRequest",
            "PlanGroupLinkResponse",
        )
    },
    EntityType {
        references: &[r("productId", "product")],
        export_type: Some("PLAN_TEMPLATES"),
        unique_code: true,
        ..entity(
            "plantemplate",
            Configuration,
            "plantemplates",
            "PlanTemplateRequest",
            "PlanTemplateResponse",
        )
    },
    EntityType {
        references: &[
            r("planId", "plan"),
            r("planTemplateId", "plantemplate"),
            r("aggregationId", "aggregation"),
            r("compoundAggregationId", "compoundaggregation"),
        ],
        date_fields: &["startDate", "endDate"],
        export_type: Some("PRICING"),
        ..entity(
            "pricing",
            Configuration,
            "pricings",
            "PricingRequest",
            "PricingResponse",
        )
    },
    EntityType {
        export_type: Some("PRODUCTS"),
        unique_code: true,
        ..entity(
            "product",
            Configuration,
            "products",
            "ProductRequest",
            "ProductResponse",
        )
    },
    EntityType {
        export_type: Some("TRANSACTION_TYPES"),
        unique_code: true,
        ..entity(
            "transactiontype",
            Configuration,
            "picklists/transactiontypes",
            "TransactionTypeRequest",
            "TransactionTypeResponse",
        )
    },
    EntityType {
        request: RequestSchema::By {
            field: "destinationType",
            default: "ExportDestinationS3Request",
            variants: &[
                ("S3", "ExportDestinationS3Request"),
                ("GCS", "ExportDestinationGoogleCloudStorageRequest"),
            ],
        },
        secrets: &["secretAccessKey"],
        unique_code: true,
        ..entity(
            "exportdestination",
            Configuration,
            "dataexports/destinations",
            "ExportDestinationS3Request",
            "ExportDestinationS3Response",
        )
    },
    EntityType {
        request: RequestSchema::By {
            field: "sourceType",
            default: "OperationalDataExportConfigurationRequest",
            variants: &[
                ("OPERATIONAL", "OperationalDataExportConfigurationRequest"),
                ("USAGE", "UsageDataExportConfigurationRequestV2"),
            ],
        },
        references: &[rs("destinationIds", "exportdestination")],
        unique_code: true,
        ..entity(
            "exportschedule",
            Configuration,
            "dataexports/schedules",
            "OperationalDataExportConfigurationRequest",
            "OperationalDataExportConfigurationResponse",
        )
    },
    EntityType {
        unique_code: true,
        ..entity(
            "notificationrule",
            Configuration,
            "notifications/configurations",
            "NotificationRequest",
            "NotificationResponse",
        )
    },
    EntityType {
        secrets: &["credentials.secret"],
        ..entity(
            "webhook",
            Configuration,
            "integrationdestinations/webhooks",
            "WebhookDestinationRequest",
            "WebhookDestinationResponse",
        )
    },
    EntityType {
        references: &[
            Reference {
                field: "destinationId",
                target: "webhook",
                many: false,
                when: Some(("destination", "webhook")),
            },
            Reference {
                field: "entityId",
                target: "notificationrule",
                many: false,
                when: Some(("entityType", "notification")),
            },
        ],
        secrets: &[
            "credentials.secret",
            "credentials.password",
            "credentials.clientSecret",
        ],
        ..entity(
            "integrationconfig",
            Configuration,
            "integrationconfigs",
            "IntegrationConfigRequest",
            "IntegrationConfigResponse",
        )
    },
    EntityType {
        ..entity(
            "scheduledeventconfig",
            Configuration,
            "scheduledevents/configurations",
            "ScheduledEventConfigurationRequest",
            "ScheduledEventConfigurationResponse",
        )
    },
    EntityType {
        http: false,
        ..entity(
            "organization",
            Configuration,
            "",
            "MeterlineOrganization",
            "MeterlineOrganization",
        )
    },
    EntityType {
        http: false,
        ..entity(
            "serviceuser",
            Configuration,
            "",
            "MeterlineServiceUser",
            "ServiceUserResponse",
        )
    },
];

/// The row for a type name, e.g. `account`.
pub fn get(name: &str) -> Option<&'static EntityType> {
    REGISTRY.iter().find(|t| t.name == name)
}

/// The row whose `export_type` is e.g. `ACCOUNTS`.
pub fn by_export_type(export_type: &str) -> Option<&'static EntityType> {
    REGISTRY.iter().find(|t| t.export_type == Some(export_type))
}

/// The row a scheduled-event configuration's `entity` names: m3ter writes
/// `Bill`, `Account`..., matched without regard to case.
pub fn by_display_name(name: &str) -> Option<&'static EntityType> {
    let lower = name.to_ascii_lowercase();
    REGISTRY.iter().find(|t| t.name == lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_subject_tokens_and_references_resolve() {
        let mut names = std::collections::HashSet::new();
        for t in REGISTRY {
            crate::subjects::validate_token("type", t.name).unwrap();
            assert!(names.insert(t.name), "duplicate {}", t.name);
        }
        for t in REGISTRY {
            for rf in t.references {
                assert!(
                    get(rf.target).is_some(),
                    "{}.{} -> {}",
                    t.name,
                    rf.field,
                    rf.target
                );
            }
            if let Some(p) = t.parent {
                assert!(get(p.target).is_some());
                assert!(
                    t.path.contains(&format!("{{{}}}", p.field)),
                    "{} path lacks parent",
                    t.name
                );
            }
        }
    }

    #[test]
    fn event_names_follow_m3ter() {
        use crate::envelope::Action;
        assert_eq!(
            get("account").unwrap().event_name(Action::Created),
            "configuration.account.created"
        );
        assert_eq!(
            get("bill").unwrap().event_name(Action::Deleted),
            "billing.bill.deleted"
        );
    }
}
