output "remote_url" {
  description = "CLOUDCKPT_REMOTE for this run."
  value       = module.access.remote_url
}

output "training_service_account_email" {
  description = "Training service account; annotate the GKE service account with it (iam.gke.io/gcp-service-account)."
  value       = module.access.training_service_account_email
}

output "restore_service_account_email" {
  description = "Read-only service account for the CI restore step."
  value       = module.access.restore_service_account_email
}

output "instance_template" {
  description = "Spot VM template; use it in a managed instance group so a preempted VM is recreated and resumes."
  value       = google_compute_instance_template.spot_training.self_link
}
