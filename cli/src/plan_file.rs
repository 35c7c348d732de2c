//! A project plan written as a Markdown file, for `nexus run plan.md`:
//!
//! ```markdown
//! ---
//! budget: 120k EUR
//! team: "4 developers"
//! ---
//! # Bakery CRM
//!
//! A CRM for a bakery with three shops: ...
//! ```
//!
//! - The front matter (optional, first line `---` up to the next `---`)
//!   holds the plan's fields, one `key: value` a line; blank lines and `#`
//!   comments are skipped, and a value may be quoted. This is the flat subset
//!   of YAML that plan fields need, read by hand: a YAML parser would accept
//!   lists and nesting only to have them refused here.
//! - The first `# ` heading (outside code blocks) names the workflow.
//! - Everything else is the description, that heading line left out: the
//!   models already see the name first (`Project: <name>`).

use nexus_proto::v1::ProjectPlan;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanFileError {
    #[error("the front matter opened on line 1 is never closed with `---`")]
    UnclosedFrontMatter,
    #[error("front matter line {line}: {text:?} is not `key: value` (only flat key: value lines are read)")]
    NotKeyValue { line: usize, text: String },
    #[error("front matter line {line}: field {key:?} is given twice")]
    DuplicateField { line: usize, key: String },
    #[error("no `# ` heading: the first one names the workflow")]
    NoHeading,
    #[error("the plan has no text besides its heading")]
    NoDescription,
}

/// Reads a plan file's text into the plan a run starts on.
pub fn parse(text: &str) -> Result<ProjectPlan, PlanFileError> {
    let text = text.trim_start_matches('\u{feff}').replace("\r\n", "\n");
    let (fields, body) = split_front_matter(&text)?;
    let (name, description) = take_heading(body)?;
    if description.is_empty() {
        return Err(PlanFileError::NoDescription);
    }
    Ok(ProjectPlan {
        name,
        description,
        fields: fields.into_iter().collect(),
    })
}

/// A plan's fields as the front matter gives them, in order.
type Fields = Vec<(String, String)>;

/// The front matter's fields and the Markdown after it.
fn split_front_matter(text: &str) -> Result<(Fields, &str), PlanFileError> {
    let Some(rest) = text.strip_prefix("---\n") else {
        return Ok((Vec::new(), text));
    };
    let mut lines = Vec::new();
    let mut offset = 0;
    for raw in rest.split_inclusive('\n') {
        offset += raw.len();
        if raw.trim_end() == "---" {
            return Ok((fields(lines)?, &rest[offset..]));
        }
        lines.push(raw.trim_end());
    }
    Err(PlanFileError::UnclosedFrontMatter)
}

/// `key: value` lines; the first line of front matter is line 2 of the file.
fn fields(lines: Vec<&str>) -> Result<Fields, PlanFileError> {
    let mut fields = Fields::new();
    for (line, content) in (2..).zip(lines) {
        let trimmed = content.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let not_key_value = || PlanFileError::NotKeyValue {
            line,
            text: content.to_string(),
        };
        if trimmed.len() != content.len() || trimmed.starts_with("- ") {
            return Err(not_key_value());
        }
        let (key, value) = content.split_once(':').ok_or_else(not_key_value)?;
        let key = key.trim();
        if key.is_empty() {
            return Err(not_key_value());
        }
        if fields.iter().any(|(known, _)| known == key) {
            return Err(PlanFileError::DuplicateField {
                line,
                key: key.to_string(),
            });
        }
        fields.push((key.to_string(), unquote(value.trim()).to_string()));
    }
    Ok(fields)
}

fn unquote(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(quote).and_then(|v| v.strip_suffix(quote)) {
            return inner;
        }
    }
    value
}

/// The first level-one heading's text, and the body without that line.
fn take_heading(body: &str) -> Result<(String, String), PlanFileError> {
    let mut in_code = false;
    let mut start = 0;
    for line in body.split_inclusive('\n') {
        let end = start + line.len();
        let content = line.trim_end();
        if content.starts_with("```") || content.starts_with("~~~") {
            in_code = !in_code;
        } else if !in_code && let Some(title) = content.strip_prefix("# ") {
            let name = title.trim().trim_end_matches('#').trim().to_string();
            if name.is_empty() {
                return Err(PlanFileError::NoHeading);
            }
            let description = format!("{}{}", &body[..start], &body[end..]);
            return Ok((name, description.trim().to_string()));
        }
        start = end;
    }
    Err(PlanFileError::NoHeading)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(plan: &ProjectPlan) -> Vec<(&str, &str)> {
        let mut fields: Vec<_> = plan.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        fields.sort();
        fields
    }

    #[test]
    fn front_matter_gives_fields_the_heading_the_name_and_the_rest_the_description() {
        let plan = parse(
            "---\nbudget: 120k EUR\n# a comment\n\nteam: \"4: two front, two back\"\nlaunch: 'Q3'\n---\n\
             # Bakery CRM\n\nA CRM for three shops.\n\n## Scope\n\n- orders\n",
        )
        .unwrap();
        assert_eq!(plan.name, "Bakery CRM");
        assert_eq!(plan.description, "A CRM for three shops.\n\n## Scope\n\n- orders");
        assert_eq!(
            fields(&plan),
            [
                ("budget", "120k EUR"),
                ("launch", "Q3"),
                ("team", "4: two front, two back")
            ]
        );
    }

    #[test]
    fn the_example_plan_reads() {
        let plan = parse(include_str!("../../examples/plan.md")).unwrap();
        assert_eq!(plan.name, "Werkbank online shop");
        assert_eq!(plan.fields["budget"], "120k EUR");
        assert_eq!(plan.fields.len(), 4);
        assert!(plan.description.starts_with("We want to build \"Werkbank\""));
    }

    #[test]
    fn a_plan_needs_no_front_matter_and_keeps_text_before_its_heading() {
        let plan = parse("Draft, do not share.\r\n\r\n# Shop #\r\nSell chairs.\r\n").unwrap();
        assert_eq!(plan.name, "Shop");
        assert_eq!(plan.description, "Draft, do not share.\n\nSell chairs.");
        assert!(plan.fields.is_empty());
    }

    #[test]
    fn a_heading_inside_a_code_block_names_nothing() {
        let plan = parse("```sh\n# not a title\n```\n# Title\ntext\n").unwrap();
        assert_eq!(plan.name, "Title");
        assert_eq!(plan.description, "```sh\n# not a title\n```\ntext");
    }

    #[test]
    fn what_the_front_matter_cannot_hold_is_refused_with_its_line() {
        let refused = |text: &str| parse(text).unwrap_err();
        assert_eq!(refused("---\nbudget: 1\n# T\nx\n"), PlanFileError::UnclosedFrontMatter);
        assert_eq!(
            refused("---\ngoals:\n  - fast\n---\n# T\nx\n"),
            PlanFileError::NotKeyValue {
                line: 3,
                text: "  - fast".into()
            }
        );
        assert_eq!(
            refused("---\njust words\n---\n# T\nx\n"),
            PlanFileError::NotKeyValue {
                line: 2,
                text: "just words".into()
            }
        );
        assert_eq!(
            refused("---\na: 1\na: 2\n---\n# T\nx\n"),
            PlanFileError::DuplicateField {
                line: 3,
                key: "a".into()
            }
        );
        assert_eq!(refused("## Only a subheading\ntext\n"), PlanFileError::NoHeading);
        assert_eq!(refused("# Title only\n"), PlanFileError::NoDescription);
    }
}
