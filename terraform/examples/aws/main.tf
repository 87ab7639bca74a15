# Example: a checkpoint bucket, least-privilege roles for one run, and a spot launch template whose user-data
# (infra/aws/spot-user-data.sh) installs cloudckpt, restores the latest checkpoint and resumes training.
# Its settings reach the instance as instance tags, read through IMDSv2 (instance_metadata_tags = "enabled").

module "bucket" {
  source      = "../../modules/aws-bucket"
  bucket_name = var.bucket_name
  kms_key_arn = var.kms_key_arn
}

module "access" {
  source                = "../../modules/aws-access"
  name                  = "cloudckpt-example"
  bucket_arn            = module.bucket.bucket_arn
  run_prefix            = var.run_prefix
  kms_key_arn           = var.kms_key_arn
  ec2_instance_profile  = true
  eks_oidc_provider_arn = var.eks_oidc_provider_arn
  eks_service_accounts  = var.eks_oidc_provider_arn == null ? [] : ["training:cloudckpt-train"]
  ci_oidc_provider_arn  = var.github_oidc_provider_arn
  ci_oidc_subjects      = ["repo:${var.github_repository}:ref:refs/heads/main"]
}

resource "aws_launch_template" "spot_training" {
  name_prefix   = "cloudckpt-spot-"
  image_id      = var.ami_id
  instance_type = var.instance_type
  user_data     = filebase64("${path.module}/../../../infra/aws/spot-user-data.sh")

  instance_market_options {
    market_type = "spot"
    spot_options {
      instance_interruption_behavior = "terminate"
    }
  }

  iam_instance_profile {
    name = module.access.instance_profile_name
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }

  block_device_mappings {
    device_name = "/dev/sda1"
    ebs {
      volume_size           = 200
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags = {
      "cloudckpt-remote"        = module.access.remote_url
      "cloudckpt-train-command" = var.train_command
      "cloudckpt-train-package" = var.train_package
      "cloudckpt-repo-url"      = var.cloudckpt_repo_url
      "cloudckpt-ref"           = var.cloudckpt_ref
    }
  }
}
