"""Model pull: plan, fetch (resumable, in parallel ranges), verify, and publish through a content-addressed cache."""
