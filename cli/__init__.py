"""clipguard.cli"""
