# Example: a checkpoint bucket, least-privilege service accounts for one run, and a spot VM template whose startup
# script (infra/gcp/spot-startup-script.sh) installs cloudckpt, restores the latest checkpoint and resumes training.
# Its settings reach the VM as instance metadata attributes.

module "bucket" {
  source      = "../../modules/gcp-bucket"
  project_id  = var.project_id
  bucket_name = var.bucket_name
  location    = var.region
}

module "access" {
  source               = "../../modules/gcp-access"
  project_id           = var.project_id
  name                 = "ckpt-example"
  bucket_name          = module.bucket.bucket_name
  run_prefix           = var.run_prefix
  gke_service_accounts = var.gke_service_accounts
  ci_principals        = var.ci_principals
}

resource "google_compute_instance_template" "spot_training" {
  name_prefix  = "cloudckpt-spot-"
  machine_type = var.machine_type
  region       = var.region

  scheduling {
    provisioning_model          = "SPOT"
    preemptible                 = true
    automatic_restart           = false
    on_host_maintenance         = "TERMINATE"
    instance_termination_action = "DELETE"
  }

  guest_accelerator {
    type  = var.gpu_type
    count = 1
  }

  disk {
    source_image = var.image
    disk_size_gb = 200
    boot         = true
    auto_delete  = true
  }

  network_interface {
    subnetwork = var.subnetwork
  }

  service_account {
    email  = module.access.training_service_account_email
    scopes = ["https://www.googleapis.com/auth/cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    startup-script          = file("${path.module}/../../../infra/gcp/spot-startup-script.sh")
    block-project-ssh-keys  = "true"
    enable-oslogin          = "TRUE"
    serial-port-enable      = "false"
    cloudckpt-remote        = module.access.remote_url
    cloudckpt-train-command = var.train_command
    cloudckpt-train-package = var.train_package
    cloudckpt-repo-url      = var.cloudckpt_repo_url
    cloudckpt-ref           = var.cloudckpt_ref
  }
}
