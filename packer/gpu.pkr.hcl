# emp-agent GPU golden image: the agent installed and enabled (not started), the profile's models pulled and its
# preparation steps run (`emp-agent bootstrap --until prepare`), then the build machine's identity scrubbed so
# that each instance gets its own at first boot. Packer 1.6.6 HCL2 (Debian's packer: the builders are built in,
# no `packer init`, no required_plugins). See packer/README.md:
#   packer build -var wheelhouse=dist/wheelhouse -only='amazon-ebs.gpu' packer/gpu.pkr.hcl
#   packer build -var wheelhouse=dist/wheelhouse -var gcp_project_id=my-project -only='googlecompute.gpu' packer/gpu.pkr.hcl
#   packer build -var wheelhouse=dist/wheelhouse -var null_ssh_host=10.0.0.5 -var null_ssh_private_key_file=key \
#     -only='null.gpu' packer/gpu.pkr.hcl          (bakes an existing machine over SSH, in place)

# What goes on the image.
variable "wheelhouse" {
  type        = string
  description = "Directory with the emp-agent wheel, its dependencies and a systemd-python wheel, built for the image's Python. Without wheels in it, the package comes from the index."
}

variable "package" {
  type        = string
  default     = "emp-agent"
  description = "What install.sh installs: emp-agent, a pin (emp-agent==0.2.0) or a wheel path."
}

variable "install_sh" {
  type        = string
  default     = ""
  description = "bootstrap/install.sh to run (empty: the one next to this folder)."
}

variable "profile" {
  type        = string
  default     = "comfyui"
  description = "The profile baked in (models and preparation) and written to /etc/emp-agent/agent.toml."
}

variable "bake_environment" {
  type        = list(string)
  default     = []
  sensitive   = true
  description = "NAME=value pairs the bake's model pulls need (HF_TOKEN, a profile's auth_env); not kept in the image."
}

variable "image_name" {
  type        = string
  default     = "emp-gpu"
  description = "Image name prefix (a timestamp is appended) and GCP image family."
}

variable "disk_size_gb" {
  type        = number
  default     = 150
  description = "Root disk of the build machine and the image: the OS, the driver, the profile's software and models."
}

# amazon-ebs: a GPU instance from an AMI that has the NVIDIA driver and Python 3.11+.
variable "aws_region" {
  type    = string
  default = "us-east-1"
}

variable "aws_instance_type" {
  type    = string
  default = "g5.xlarge"
}

variable "aws_source_ami_name" {
  type        = string
  default     = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *"
  description = "Name filter of the source AMI (the newest match is used)."
}

variable "aws_source_ami_owners" {
  type    = list(string)
  default = ["amazon"]
}

variable "aws_root_device_name" {
  type    = string
  default = "/dev/sda1"
}

variable "aws_ssh_username" {
  type    = string
  default = "ubuntu"
}

# googlecompute: a GPU machine from an image family that has the NVIDIA driver and Python 3.11+.
variable "gcp_project_id" {
  type        = string
  default     = ""
  description = "Required for the googlecompute source."
}

variable "gcp_zone" {
  type    = string
  default = "us-central1-a"
}

variable "gcp_machine_type" {
  type        = string
  default     = "g2-standard-8"
  description = "G2 machine types come with their L4 GPU; other types need accelerator_type."
}

variable "gcp_source_image_family" {
  type    = string
  default = "ubuntu-accelerator-2404-amd64-with-nvidia-550"
}

variable "gcp_source_image_project_id" {
  type    = list(string)
  default = ["ubuntu-os-accelerator-images"]
}

variable "gcp_ssh_username" {
  type    = string
  default = "packer"
}

# null: an existing machine over SSH (baked in place; nothing is created or captured).
variable "null_ssh_host" {
  type    = string
  default = "127.0.0.1"
}

variable "null_ssh_port" {
  type    = number
  default = 22
}

variable "null_ssh_username" {
  type    = string
  default = "root"
}

variable "null_ssh_private_key_file" {
  type        = string
  default     = ""
  description = "Required for the null source."
}

locals {
  timestamp  = formatdate("YYYYMMDDhhmmss", timestamp())
  install_sh = var.install_sh != "" ? var.install_sh : "${path.root}/../bootstrap/install.sh"
  bake_dir   = "/tmp/emp-agent-bake"
}

source "amazon-ebs" "gpu" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  ssh_username  = var.aws_ssh_username
  ami_name      = "${var.image_name}-${local.timestamp}"
  source_ami_filter {
    filters = {
      name                = var.aws_source_ami_name
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = var.aws_source_ami_owners
    most_recent = true
  }
  launch_block_device_mappings {
    device_name           = var.aws_root_device_name
    volume_size           = var.disk_size_gb
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 250
    delete_on_termination = true
  }
  tags = {
    Name        = "${var.image_name}-${local.timestamp}"
    emp-profile = var.profile
  }
}

source "googlecompute" "gpu" {
  project_id              = var.gcp_project_id
  zone                    = var.gcp_zone
  machine_type            = var.gcp_machine_type
  source_image_family     = var.gcp_source_image_family
  source_image_project_id = var.gcp_source_image_project_id
  ssh_username            = var.gcp_ssh_username
  disk_size               = var.disk_size_gb
  on_host_maintenance     = "TERMINATE"
  image_name              = "${var.image_name}-${local.timestamp}"
  image_family            = var.image_name
  image_labels = {
    emp-profile = var.profile
  }
}

source "null" "gpu" {
  communicator         = "ssh"
  ssh_host             = var.null_ssh_host
  ssh_port             = var.null_ssh_port
  ssh_username         = var.null_ssh_username
  ssh_private_key_file = var.null_ssh_private_key_file
  ssh_timeout          = "2m"
}

build {
  sources = ["source.amazon-ebs.gpu", "source.googlecompute.gpu", "source.null.gpu"]

  provisioner "shell" {
    inline = ["rm -rf ${local.bake_dir}", "mkdir -p ${local.bake_dir}/wheelhouse"]
  }

  provisioner "file" {
    source      = local.install_sh
    destination = "${local.bake_dir}/install.sh"
  }

  provisioner "file" {
    source      = "${var.wheelhouse}/"
    destination = "${local.bake_dir}/wheelhouse"
  }

  # The agent, enabled but not started; then the profile's models and preparation, without registering.
  provisioner "shell" {
    scripts = ["${path.root}/scripts/install-agent.sh", "${path.root}/scripts/bake-profile.sh"]
    environment_vars = concat([
      "EMP_BAKE_DIR=${local.bake_dir}",
      "EMP_BAKE_PACKAGE=${var.package}",
      "EMP_BAKE_PROFILE=${var.profile}",
      "EMP_AGENT_PROFILE=${var.profile}",
    ], var.bake_environment)
    timeout = "3h"
  }

  # Last: the build machine's identity goes, the models stay.
  provisioner "shell" {
    script = "${path.root}/scripts/scrub-identity.sh"
  }
}
