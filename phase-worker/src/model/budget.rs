//! Cost caps per run. A run may carry a cap (`max_cost_usd`); what its
//! phases cost is added up in its state hash as they complete (the
//! provider's reported cost, so the estimate is reconciled after every
//! call). Before each model call the worker estimates the call's cost from
//! its prompt (about four characters a token) and the model's input price;
//! if the run's spend plus that estimate would pass the cap, the phase fails
//! with the reason instead of calling. The estimate leaves the answer out:
//! its length is unknown until it is written, so a call may still end a
//! little over the cap, and the next one is then refused.

use super::call::ChatRequest;
use std::collections::HashMap;

/// A run's cap and spend, read when its phase starts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunBudget {
    /// USD; 0 for no cap.
    pub cap_usd: f64,
    pub spent_usd: f64,
    /// The tenant whose run it is (for its spend metric); empty without tenants.
    pub tenant: String,
}

/// Prices in USD per million tokens (input, output), by model id.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelPrices {
    per_model: HashMap<String, (f64, f64)>,
}

/// OpenRouter's list prices of the default models.
pub const DEFAULT_MODEL_PRICES: &str = "anthropic/claude-sonnet-4.5=3/15,google/gemini-3-pro-preview=2/12";

impl std::str::FromStr for ModelPrices {
    type Err = String;

    /// `model=input/output,...` in USD per million tokens.
    fn from_str(text: &str) -> Result<Self, String> {
        let per_model = text
            .split(',')
            .filter(|pair| !pair.trim().is_empty())
            .map(|pair| {
                let (model, prices) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("{pair:?} is not model=input/output"))?;
                let (input, output) = prices
                    .split_once('/')
                    .ok_or_else(|| format!("{prices:?} is not input/output (USD per million tokens)"))?;
                let number = |text: &str| {
                    text.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|n| n.is_finite() && *n >= 0.0)
                        .ok_or_else(|| format!("{text:?} is not a price"))
                };
                Ok((model.trim().to_string(), (number(input)?, number(output)?)))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { per_model })
    }
}

impl ModelPrices {
    /// What sending the request's prompt costs, if the model's price is known.
    pub fn prompt_cost_usd(&self, request: &ChatRequest) -> Option<f64> {
        let (input, _) = self.per_model.get(&request.model)?;
        let chars: usize = request.messages.iter().map(|m| m.content.chars().count()).sum();
        let tokens = (chars as f64 / 4.0).ceil();
        Some(tokens * input / 1e6)
    }
}

impl RunBudget {
    /// Why the call may not be made, or `None` when it may.
    pub fn refusal(&self, estimate_usd: Option<f64>) -> Option<String> {
        if self.cap_usd <= 0.0 {
            return None;
        }
        let estimate = estimate_usd.unwrap_or(0.0);
        (self.spent_usd + estimate > self.cap_usd).then(|| {
            format!(
                "the run's cost cap of ${:.6} would be passed: ${:.6} spent, and this call's prompt alone costs about ${:.6}",
                self.cap_usd, self.spent_usd, estimate
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ChatMessage;

    fn request(model: &str, chars: usize) -> ChatRequest {
        ChatRequest {
            model: model.into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "x".repeat(chars),
            }],
            temperature: None,
            max_tokens: None,
            response_format: None,
            traceparent: None,
            accept_truncated: false,
            reasoning_effort: None,
        }
    }

    #[test]
    fn the_prompt_is_priced_at_four_characters_a_token() {
        let prices: ModelPrices = DEFAULT_MODEL_PRICES.parse().unwrap();
        let cost = prices
            .prompt_cost_usd(&request("anthropic/claude-sonnet-4.5", 4_000_000))
            .unwrap();
        assert!((cost - 3.0).abs() < 1e-9, "{cost}");
        assert_eq!(prices.prompt_cost_usd(&request("unknown/model", 10)), None);
        assert!("m=1".parse::<ModelPrices>().is_err());
    }

    #[test]
    fn a_call_that_would_pass_the_cap_is_refused() {
        let budget = RunBudget {
            cap_usd: 1.0,
            spent_usd: 0.9,
            ..RunBudget::default()
        };
        assert!(budget.refusal(Some(0.05)).is_none());
        assert!(budget.refusal(Some(0.2)).unwrap().contains("cost cap of $1.000000"));
        assert!(
            RunBudget::default().refusal(Some(100.0)).is_none(),
            "no cap, no refusal"
        );
        let spent = RunBudget {
            cap_usd: 1.0,
            spent_usd: 1.01,
            ..RunBudget::default()
        };
        assert!(
            spent.refusal(None).is_some(),
            "an unknown price still stops a spent run"
        );
    }
}
