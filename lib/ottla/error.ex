defmodule Ottla.Error do
  @moduledoc """
  An error from Kafka or from Ottla itself.

    * `:code` - a snake_case atom: librdkafka's error name (`:unknown_topic_or_partition`,
      `:message_timed_out`, `:topic_already_exists`, `:broker_transport_failure`, ...) or one of
      Ottla's own (`:invalid_config`, `:closed`, `:no_producer`, `:timed_out`).
    * `:message` - a human-readable explanation.
    * `:retriable?` - `true` when trying again later may succeed (a broker down, a leader
      election, a timeout).
    * `:possibly_persisted?` - for a message that `Ottla.produce/4` reports as failed: `true`
      when it may have been written all the same (librdkafka's message status: it was sent
      and no answer came, or it is still queued when the call's `:timeout` passed).
      Retrying such a message may write it twice; retrying one with `false` does not.

  ## Example

      iex> error = %Ottla.Error{code: :timed_out, message: "no answer", retriable?: true}
      iex> Exception.message(error)
      "timed_out: no answer"
  """

  defexception code: :kafka_error, message: "", retriable?: false, possibly_persisted?: false

  @type t :: %__MODULE__{
          code: atom,
          message: String.t(),
          retriable?: boolean,
          possibly_persisted?: boolean
        }

  @impl true
  def message(%__MODULE__{code: code, message: message}), do: "#{code}: #{message}"

  @doc false
  @spec new(atom, String.t(), boolean) :: t
  def new(code, message, retriable? \\ false),
    do: %__MODULE__{code: code, message: message, retriable?: retriable?}
end
