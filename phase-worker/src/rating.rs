//! The rating phase's structured output: the JSON schema we ask the model to
//! follow, and the validation of what it answers. An answer that does not
//! validate is a failed try, retried like any other.

use nexus_proto::v1::Rating;
use serde::Deserialize;
use serde_json::json;

/// `response_format` for OpenRouter's structured outputs.
pub fn response_format() -> serde_json::Value {
    json!({
        "type": "json_schema",
        "json_schema": {
            "name": "plan_rating",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": {
                    "score": {"type": "integer", "minimum": 1, "maximum": 10, "description": "1 = unusable, 10 = ready to execute"},
                    "reasons": {"type": "array", "items": {"type": "string"}, "minItems": 1}
                },
                "required": ["score", "reasons"],
                "additionalProperties": false
            }
        }
    })
}

#[derive(Deserialize)]
struct RatingAnswer {
    score: serde_json::Number,
    reasons: Vec<String>,
}

/// Parses and validates a rating answer. Tolerates a Markdown code fence
/// around the JSON, which some models add even when asked not to.
pub fn parse_rating(text: &str) -> Result<Rating, String> {
    let json = strip_code_fence(text.trim());
    let answer: RatingAnswer = serde_json::from_str(json)
        .map_err(|error| format!("rating is not the expected JSON ({error}): {}", excerpt(text)))?;
    let score = answer
        .score
        .as_u64()
        .filter(|score| (1..=10).contains(score))
        .ok_or_else(|| format!("rating score {} is not an integer from 1 to 10", answer.score))?;
    let reasons: Vec<String> = answer
        .reasons
        .into_iter()
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect();
    if reasons.is_empty() {
        return Err("rating has no reasons".into());
    }
    Ok(Rating {
        score: score as u32,
        reasons,
    })
}

fn strip_code_fence(text: &str) -> &str {
    let Some(inner) = text.strip_prefix("```") else {
        return text;
    };
    let inner = inner.trim_start_matches("json");
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

fn excerpt(text: &str) -> String {
    let short: String = text.chars().take(120).collect();
    if short.len() < text.len() {
        format!("{short}…")
    } else {
        short
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rating;

    #[test]
    fn valid_rating_parses() {
        let rating = parse_rating(r#"{"score": 8, "reasons": ["clear", "costed"]}"#).unwrap();
        assert_eq!(rating.score, 8);
        assert_eq!(rating.reasons, ["clear", "costed"]);
    }

    #[test]
    fn fenced_json_is_accepted() {
        assert_eq!(
            parse_rating("```json\n{\"score\": 3, \"reasons\": [\"thin\"]}\n```")
                .unwrap()
                .score,
            3
        );
    }

    #[test]
    fn out_of_range_or_fractional_scores_are_rejected() {
        for bad in [
            r#"{"score": 0, "reasons": ["x"]}"#,
            r#"{"score": 11, "reasons": ["x"]}"#,
            r#"{"score": 7.5, "reasons": ["x"]}"#,
        ] {
            assert!(parse_rating(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_reasons_or_prose_are_rejected() {
        assert!(parse_rating(r#"{"score": 5, "reasons": []}"#).is_err());
        assert!(
            parse_rating("I would rate it 7/10")
                .unwrap_err()
                .contains("not the expected JSON")
        );
    }
}
